"""Preference rows (pairs for DPO/IPO/ORPO/SimPO, labelled replies for KTO) → checked, rendered samples.

Formats, detected per file like the SFT formats (data/formats.py), every row checked before a model loads:
- `trl`: `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a string or an OpenAI message list
  (TRL's preference format: the prompt's messages, each branch a list holding one assistant message);
- `messages`: `{"messages": [context ending with a user turn], "chosen": {role, content}, "rejected": {...}}`;
- `alpaca`: `{"instruction", "input"?, "system"?, "chosen", "rejected"}`;
- `kto` (unpaired): `{"messages": [..., the reply], "label": true|false}`.

A pair is rendered as two conversations that differ only in their last assistant turn, through the
renderer of SFT (data/render.py), so each branch is trained where inference would write it, through
its end-of-turn token. The untrained part (the shared prompt) must come out the same token for token
in both branches, else the two log-probabilities would not be comparable: that row is an error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from chatlora.data.formats import Conversation, Message, _check_order, _text, _turns, check_rows
from chatlora.data.read import RawRow
from chatlora.data.render import IGNORE, Renderer, RenderError, Tokenized
from chatlora.errors import DataError, Problem

EXPECTED = (
    "trl: {prompt, chosen, rejected} (strings or message lists); "
    "messages: {messages: [context], chosen: {role, content}, rejected: {role, content}}; "
    "alpaca: {instruction, chosen, rejected[, input, system]}; "
    "kto: {messages: [..., reply], label: true|false}"
)
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
FORMATS = ("trl", "messages", "alpaca", "kto")


@dataclass
class Preference:
    """One checked row: a prompt (system?, user/assistant turns, ending with a user turn) and its
    replies. A pair has `chosen` and `rejected`; a KTO row has `chosen` only, and `label`."""

    prompt: list[Message]
    chosen: Message
    rejected: Message | None
    source: str
    where: str
    label: bool | None = None


def is_preference(rows: list[RawRow]) -> bool:
    """Whether the rows of a file look like preference data (a `chosen` or a `label` field)."""
    return any(isinstance(r.value, dict) and ("chosen" in r.value or "label" in r.value) for r in rows)


def detect(rows: list[RawRow], path: str) -> str:
    """The preference format most rows of a file follow. Raises DataError naming the keys seen."""
    votes: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for row in rows:
        if isinstance(row.value, dict):
            keys = row.value.keys()
            seen.update(keys)
            if "label" in keys and "messages" in keys:
                votes["kto"] += 1
            elif "chosen" in keys and "prompt" in keys:
                votes["trl"] += 1
            elif "chosen" in keys and "messages" in keys:
                votes["messages"] += 1
            elif "chosen" in keys and "instruction" in keys:
                votes["alpaca"] += 1
    if not votes:
        keys = ", ".join(k for k, _ in seen.most_common(12)) or "no object rows at all"
        raise DataError([Problem(path, "", "", f"rows fit no preference format; keys seen: {keys}")],
                        hint=f"Expected one of {EXPECTED}.")
    return votes.most_common(1)[0][0]


def to_preferences(rows: list[RawRow], fmt: str, system_prompt: str | None = None) -> list[Preference]:
    """Convert and check every row. Raises DataError listing every bad row at once."""

    def preference(row: RawRow, errs: list) -> Preference | None:
        got = _CONVERT[fmt](row.value, errs)
        if got is None or errs:
            return None
        prompt, chosen, rejected, label = got
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        return Preference(prompt, chosen, rejected, row.source, row.where, label)

    return check_rows(rows, preference, f"Rows were read as {fmt} preference rows: {EXPECTED}.")


def _prompt_of(context: list[Message], field: str, errs: list) -> list[Message] | None:
    """A prompt must be a conversation that a reply can follow: checked as one with a stand-in reply."""
    if not context:
        return None
    probe = [dict(m) for m in context] + [{"role": "assistant", "content": "x"}]
    _check_order(probe, errs, "openai")
    if errs:
        errs[:] = [(f or field, r) for f, r in errs]
        return None
    return probe[:-1]


def _reply(value, field: str, errs: list) -> Message | None:
    """A reply: a string, an assistant message, or a list of one assistant message (TRL's form)."""
    if value is None:
        errs.append((field, "missing"))
        return None
    if isinstance(value, list):
        if len(value) != 1:
            errs.append((field, f"must hold exactly one assistant message, got {len(value)}"))
            return None
        value, field = value[0], f"{field}[0]"
    if isinstance(value, dict):
        messages = _turns({"m": [value]}, "m", "role", "content", errs, ROLES)
        if not messages:
            return None
        if messages[0]["role"] != "assistant":
            errs.append((f"{field}.role", f"must be 'assistant', got {messages[0]['role']!r}"))
            return None
        message = {k: v for k, v in messages[0].items() if k != "_field"}
    else:
        text = _text({"v": value}, "v", errs, field)
        if text is None:
            return None
        message = {"role": "assistant", "content": text}
    if not message["content"].strip():
        errs.append((field, "empty reply"))
        return None
    return message


def _branches(row: dict, errs: list) -> tuple[Message | None, Message | None]:
    chosen, rejected = _reply(row.get("chosen"), "chosen", errs), _reply(row.get("rejected"), "rejected", errs)
    if chosen is not None and rejected is not None and chosen == rejected:
        errs.append(("rejected", "the same reply as chosen; a pair must differ"))
    return chosen, rejected


def _trl(row: dict, errs: list):
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        context = _turns(row, "prompt", "role", "content", errs, ROLES)
    else:
        text = _text(row, "prompt", errs)
        context = [{"role": "user", "content": text}] if text is not None else []
        if text is not None and not text.strip():
            errs.append(("prompt", "empty message"))
    context = _prompt_of(context, "prompt", errs) if not errs else None
    chosen, rejected = _branches(row, errs)
    return (context, chosen, rejected, None) if not errs else None


def _messages(row: dict, errs: list):
    context = _prompt_of(_turns(row, "messages", "role", "content", errs, ROLES), "messages", errs) if not errs else None
    chosen, rejected = _branches(row, errs)
    return (context, chosen, rejected, None) if not errs else None


def _alpaca(row: dict, errs: list):
    instruction = _text(row, "instruction", errs)
    extra = _text(row, "input", errs, required=False) or ""
    system = _text(row, "system", errs, required=False)
    prompt = "\n".join(x for x in (instruction, extra) if x)
    if instruction is not None and not prompt.strip():
        errs.append(("instruction", "empty (and input is empty too)"))
    chosen, rejected = _branches(row, errs)
    context = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    return (context, chosen, rejected, None) if not errs else None


def _kto(row: dict, errs: list):
    label = row.get("label")
    if not isinstance(label, bool):
        errs.append(("label", "missing" if label is None else f"must be true or false, got {label!r}"))
    messages = _turns(row, "messages", "role", "content", errs, ROLES)
    if errs:
        return None
    _check_order(messages, errs, "openai")
    if errs:
        return None
    return messages[:-1], messages[-1], None, label


_CONVERT = {"trl": _trl, "messages": _messages, "alpaca": _alpaca, "kto": _kto}


def render_preference(renderer: Renderer, row: Preference) -> tuple[Tokenized, Tokenized | None]:
    """(chosen sample, rejected sample or None): each the prompt and one reply, trained on that reply
    only (through its end-of-turn token). Raises RenderError, also when the prompt renders differently
    in the two branches."""
    turn = len(row.prompt)
    chosen = renderer.tokenize(row.prompt + [row.chosen], [turn])
    if row.rejected is None:
        return chosen, None
    rejected = renderer.tokenize(row.prompt + [row.rejected], [turn])
    a, b = _untrained_head(chosen), _untrained_head(rejected)
    if chosen.input_ids[:a] != rejected.input_ids[:b]:
        raise RenderError("the shared prompt renders differently before the chosen and the rejected reply, "
                          "so their log-probabilities would not be compared on the same prompt")
    return chosen, rejected


def _untrained_head(sample: Tokenized) -> int:
    return next(k for k, label in enumerate(sample.labels) if label != IGNORE)


def read_preferences(rows: list[RawRow], path: str, fmt: str, system_prompt: str | None) -> tuple[str, list[Preference]]:
    """(format, checked rows) of one file: `fmt` auto detects it. Raises DataError."""
    fmt = detect(rows, path) if fmt == "auto" else fmt
    return fmt, to_preferences(rows, fmt, system_prompt)


def as_conversation(row: Preference):
    """The row as a conversation answered by its chosen reply: what the held-out replies monitor asks."""
    return Conversation(row.prompt + [row.chosen], row.source, row.where)

