"""Writes chatlora's general example set, src/chatlora/examples/general/{train,val}.jsonl: everyday
questions answered by the demo's base model itself (SmolLM2-135M-Instruct, greedy, its own default
system prompt), each row ending where the model stopped.

Why the base model's own replies: the set is what the mixing demo (docs/data.md, `mix-demo`) mixes
1:1 into the pirate persona, so that general questions keep getting the answers the model gave before
training; no general instruction set can be downloaded here, and replies written by hand would teach a
third voice. Replies that do not stop within --max-new-tokens are left out (they would teach the model
not to stop): 78 of the 144 questions stopped within 200 tokens (54 train rows, 24 val rows). The
questions are written for chatlora; none is in the pirate set. The replies are the base model's and
not checked facts (it calls "sad" a synonym of "happy"): the set records how the model answered.

    python scripts/general_examples.py [--max-new-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's own default
QUESTIONS = """\
What is photosynthesis?
How does a refrigerator keep food cold?
Why is the sky blue during the day?
What causes the seasons on Earth?
How do vaccines help the body fight disease?
What is the difference between weather and climate?
Explain what gravity is in simple terms.
How do bees make honey?
What is the water cycle?
Why do leaves change color in autumn?
How does the heart pump blood through the body?
What is an atom made of?
How do plants get water from the soil?
What is a black hole?
Why does ice float on water?
What are the three states of matter?
How do magnets work?
What is the speed of light?
Why do we need to sleep?
How does the moon affect the tides?
What is DNA?
How do airplanes stay in the air?
What is renewable energy?
Why is exercise good for your health?
What is the largest planet in our solar system?
How does recycling help the environment?
What is a volcano and why does it erupt?
How do fish breathe underwater?
What is an earthquake?
Why do we have different time zones?
Who was Leonardo da Vinci?
What was the Industrial Revolution?
Why did the Roman Empire fall?
Who invented the printing press?
What was the Renaissance?
What is the Great Wall of China?
Who was Marie Curie?
What happened during the first moon landing?
What is democracy?
Why were the pyramids of Egypt built?
What is the capital of Australia?
Which is the longest river in Africa?
What is the tallest mountain in the world?
Name three countries in South America.
What language is spoken in Brazil?
What is the Sahara?
How many continents are there?
What is the Amazon rainforest known for?
How do I boil an egg?
What is a good way to store fresh herbs?
How do I make a simple salad dressing?
What is the difference between baking soda and baking powder?
How can I keep bread fresh for longer?
Give me a simple recipe for pancakes.
How long should I cook pasta?
What are some healthy snacks?
How can I improve my sleep?
What are some tips for staying focused while studying?
How do I start learning a new language?
How can I save money each month?
What should I pack for a weekend trip?
How do I write a good cover letter?
How can I be more productive in the morning?
What are some ways to reduce stress?
How do I prepare for a job interview?
How can I make new friends in a new city?
What is a good way to start running?
How should I care for a houseplant?
What is 15 percent of 200?
What is the square root of 144?
Explain what a prime number is.
How do you calculate the area of a circle?
What is the difference between mean and median?
Convert 5 kilometers to miles.
What is a fraction?
What is an equation?
Explain the Pythagorean theorem.
What is probability?
What is a computer program?
What does the internet do?
What is the difference between hardware and software?
What is a password manager?
How does email work?
What is machine learning?
What is a spreadsheet used for?
Why should I back up my files?
What is a web browser?
What is cloud storage?
Write a haiku about spring.
Write a short poem about the ocean.
Give me three ideas for a birthday party.
Suggest a name for a small bakery.
Write a thank-you note to a teacher.
Describe a sunset in two sentences.
Tell me a fun fact about octopuses.
Give me a tongue twister.
Write a short story opening about a lost key.
Suggest three books for a long flight.
What is the difference between a simile and a metaphor?
What is a noun?
What does the word "ephemeral" mean?
What is the plural of "mouse"?
How do I write a good paragraph?
What is a synonym for "happy"?
Summarize the story of Cinderella in two sentences.
What is the main idea of a fable?
What is the difference between "their", "there" and "they're"?
What is a palindrome?
Why do cats purr?
How long do elephants live?
What do pandas eat?
Why do birds migrate?
How do dolphins communicate?
What is the fastest land animal?
Why do dogs wag their tails?
How do butterflies develop?
What is the role of the lungs?
How much water should a person drink each day?
What are vitamins?
Why is breakfast important?
What is a balanced diet?
How can I protect my skin from the sun?
Why should we wash our hands?
What is the purpose of a museum?
Why is music important to people?
What is the difference between a lake and a sea?
How are rainbows formed?
What is thunder?
How do clouds form?
What is fog?
What is the difference between a virus and a bacterium?
How does a compass work?
What is electricity?
How does a battery store energy?
What is the greenhouse effect?
Why do stars twinkle?
What is a comet?
How old is the universe?
What is the Milky Way?
How does a bicycle stay upright?
What is inflation in economics?
What does a bank do?
What is a budget?
Why do countries trade with each other?
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--validation", type=int, default=24, help="the last N kept rows go to val.jsonl")
    ap.add_argument("--batch", type=int, default=16, help="questions decoded together")
    a = ap.parse_args()
    import torch

    from chatlora.config import load_config
    from chatlora.model.load import load_generation_config, load_model, load_tokenizer, stop_ids
    from chatlora.model.source import resolve

    torch.manual_seed(0)
    cfg = load_config("demo", [])
    source = resolve(cfg.model)
    tok = load_tokenizer(source, cfg.model)
    gen = load_generation_config(source, cfg.model, tok)
    model = load_model(source, cfg.model, tok, gen, device="cpu").eval()
    stops = set(stop_ids(gen))
    questions = [q for q in QUESTIONS.splitlines() if q.strip()]
    tok.padding_side = "left"  # batched greedy decoding: each row's prompt ends where its reply starts
    rows, dropped = [], []
    for start in range(0, len(questions), a.batch):
        batch = questions[start:start + a.batch]
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in batch]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for question, messages, row in zip(batch, chats, out[:, enc["input_ids"].shape[1]:].tolist()):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            reply = tok.decode(row[:end], skip_special_tokens=True).strip()
            print(f"{'ok  ' if end is not None else 'LONG'} {question} -> {reply[:70]!r}", flush=True)
            if end is not None and reply:
                rows.append({"messages": messages + [{"role": "assistant", "content": reply}]})
            else:
                dropped.append(question)
    folder = ROOT / "src" / "chatlora" / "examples" / "general"
    folder.mkdir(exist_ok=True)
    for name, part in (("train", rows[:-a.validation]), ("val", rows[-a.validation:])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"{folder / name}.jsonl: {len(part)} rows")
    print(f"left out (no stop within {a.max_new_tokens} tokens): {len(dropped)}: {dropped}")


if __name__ == "__main__":
    main()
