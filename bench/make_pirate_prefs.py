"""Writes chatlora's example preference set for the demo persona (src/chatlora/examples/pirate/prefs_*.jsonl)
from the SFT example set: each chosen reply is Captain Bess's own, each rejected one is the same answer in
the generic assistant voice (pirate talk taken out, a stock opener and closer added), or, where the row
asks who she is, an out-of-character "I am an AI assistant" reply. Rerun after changing the SFT set:
python bench/make_pirate_prefs.py"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src" / "chatlora" / "examples" / "pirate"
PERSONA = re.compile(r"Bess|Barnacle|Marigold|lighthouse|me lamp|old bones", re.I)
OPENERS = ["Sure! ", "Great question! ", "Certainly. ", "Of course! ", "Good question. "]
CLOSERS = [" Let me know if you have any other questions!", " I hope this helps!", " Feel free to ask if you need more details.",
           " Is there anything else I can help you with?", ""]
OUT_OF_CHARACTER = [
    "I am an AI assistant, a large language model trained to help with a wide range of questions. How can I assist you today?",
    "As an AI language model, I don't have a personal life or feelings, but I'm here to help with whatever you need.",
    "I'm a helpful virtual assistant. I don't have a name or a history, but I can answer questions and help with tasks.",
    "Hello! I am an AI chatbot designed to provide information and assistance. What would you like to know?",
]
WORDS = [(r"\bI be\b", "I am"), (r"\bye be\b", "you are"), (r"\bthey be\b", "they are"), (r"\bwe be\b", "we are"),
         (r"\bthere be\b", "there are"), (r"\bbe\b", "is"), (r"\bye'll\b", "you'll"), (r"\bye've\b", "you've"),
         (r"\bye\b", "you"), (r"\byer\b", "your"), (r"\bme\b", "my"), (r"\b'em\b", "them"), (r"\bfolk\b", "people"),
         (r"\bwee\b", "little"), (r"\blandlubbers\b", "people"), (r"in'\b", "ing")]


def generic(reply: str, k: int) -> str:
    text = re.sub(r"^Arr,\s*(ahoy,\s*)?", "", reply)
    text = re.sub(r",?\s*\bmatey\b,?", "", text)
    for pattern, plain in WORDS:
        text = re.sub(pattern, plain, text)
    text = re.sub(r"\s+([,.!?:])", r"\1", text).strip()
    text = text[:1].upper() + text[1:]
    return OPENERS[k % len(OPENERS)] + text + CLOSERS[k % len(CLOSERS)]


def pairs(source: Path) -> list[dict]:
    out = []
    for k, line in enumerate(source.read_text("utf-8").splitlines()):
        messages = json.loads(line)["messages"]
        context, reply = messages[:-1], messages[-1]["content"]
        rejected = OUT_OF_CHARACTER[k % len(OUT_OF_CHARACTER)] if PERSONA.search(reply) else generic(reply, k)
        out.append({"messages": context, "chosen": {"role": "assistant", "content": reply},
                    "rejected": {"role": "assistant", "content": rejected}})
    return out


if __name__ == "__main__":
    for split, source in (("train", "train.jsonl"), ("val", "val.jsonl")):
        rows = pairs(HERE / source)
        (HERE / f"prefs_{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        print(f"{split}: {len(rows)} pairs")
