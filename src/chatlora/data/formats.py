"""Row formats (alpaca, ShareGPT, OpenAI messages) → conversations, with every row checked.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`: an optional
system message, then user and assistant turns alternating, ending with an assistant turn.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from chatlora.data.read import RawRow
from chatlora.errors import DataError, Problem

Message = dict[str, str]

EXPECTED = (
    "alpaca: {instruction, output[, input, system, history]}; "
    "sharegpt: {conversations: [{from, value}, ...][, system]}; "
    "openai: {messages: [{role, content[, reasoning_content]}, ...]}"
)
# The key that marks each format, for detection.
MARKERS = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


@dataclass
class Conversation:
    messages: list[Message]
    source: str
    where: str
    group: str = ""
    """The `data.train` source it came from (a folder's or glob's files share one); "" = `source`."""
    train_on: str | None = field(default=None, compare=False)
    """The source's own data.train_on, when it has one."""


# Per-turn keys: renamed inside each turn of `messages` / `conversations`, not at the row's top level.
TURN_KEYS = ("role", "content", "from", "value")


def map_columns(rows: list[RawRow], columns: dict[str, str], roles: dict[str, str]) -> list[RawRow]:
    """Rows with the file's own key and role names renamed to chatlora's (a source's `columns` and
    `roles`: ours -> the file's). A key of ours that another column is renamed to is dropped, so a
    file holding both `output` and `answer` with `output: answer` trains on `answer`."""
    if not columns and not roles:
        return rows
    top = {theirs: ours for ours, theirs in columns.items() if ours not in TURN_KEYS}
    turn = {theirs: ours for ours, theirs in columns.items() if ours in TURN_KEYS}
    role_names = {theirs: ours for ours, theirs in roles.items()}
    out = []
    for row in rows:
        value = row.value
        if isinstance(value, dict):
            value = {top.get(k, k): v for k, v in value.items() if k in top or k not in columns}
            for key in ("messages", "conversations"):
                if isinstance(value.get(key), list):
                    value[key] = [_map_turn(t, turn, role_names, columns) for t in value[key]]
        out.append(RawRow(row.source, row.where, value))
    return out


def _map_turn(turn, keys: dict[str, str], role_names: dict[str, str], columns: dict[str, str]):
    if not isinstance(turn, dict):
        return turn
    turn = {keys.get(k, k): v for k, v in turn.items() if k in keys or k not in columns}
    for key in ("role", "from"):
        if isinstance(turn.get(key), str):
            turn[key] = role_names.get(turn[key], turn[key])
    return turn


def file_field(name: str, columns: dict[str, str]) -> str:
    """A problem's field (`messages[2].content`) under the file's own key names (`dialog[2].text`)."""
    return re.sub(r"[A-Za-z_]+", lambda m: columns.get(m.group(), m.group()), name) if columns else name


def detect_format(rows: list[RawRow], path: str) -> str:
    """The format most rows of a file follow. Raises DataError naming the keys seen when none fits."""
    votes: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for row in rows:
        if isinstance(row.value, dict):
            seen.update(row.value.keys())
            votes.update(fmt for fmt, key in MARKERS.items() if key in row.value)
    if not votes:
        keys = ", ".join(k for k, _ in seen.most_common(12)) or "no object rows at all"
        raise DataError([Problem(path, "", "", f"rows fit no known format; keys seen: {keys}")], hint=f"Expected one of {EXPECTED}.")
    return votes.most_common(1)[0][0]


def to_conversations(rows: list[RawRow], fmt: str, system_prompt: str | None = None,
                     columns: dict[str, str] | None = None) -> list[Conversation]:
    """Convert and check every row (mapped by `map_columns` first, if the source renames keys; its
    `columns` name the fields of problems as the file has them). Raises DataError listing every bad
    row at once."""
    convert = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}[fmt]

    def conversation(row: RawRow, errs: list) -> Conversation | None:
        messages = convert(row.value, errs)
        if not errs:
            _check_order(messages, errs, fmt)
        if errs:
            return None
        if system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Conversation(messages, row.source, row.where)

    return check_rows(rows, conversation, f"Rows were read as {fmt}: {EXPECTED}.", columns)


def check_rows(rows: list[RawRow], convert, hint: str, columns: dict[str, str] | None = None) -> list:
    """Every row through `convert(row, errs)`, which returns the row's item, or None with `errs` filled
    as (field, reason). Returns the items, or raises one DataError listing every bad row at once (the
    SFT and the preference formats share it)."""
    out, problems = [], []
    for row in rows:
        errs: list[tuple[str, str]] = []
        if not isinstance(row.value, dict):
            errs.append(("", f"a row must be a JSON object, got {type(row.value).__name__}"))
        else:
            item = convert(row, errs)
            if item is not None and not errs:
                out.append(item)
        problems += [Problem(row.source, row.where, file_field(name, columns or {}), reason) for name, reason in errs]
    if problems:
        raise DataError(problems, hint=hint)
    return out


def _text(row: dict, key: str, errs: list, field: str | None = None, required: bool = True) -> str | None:
    field = field or key
    if key not in row or (row[key] is None and not required):  # alpaca dumps often hold "input": null
        if required:
            errs.append((field, "missing"))
        return None
    value = row[key]
    if not isinstance(value, str):
        errs.append((field, f"must be a string, got {type(value).__name__}"))
        return None
    why = not_text(value)
    if why:
        errs.append((field, why))
        return None
    return value


def not_text(value: str) -> str | None:
    """Why a JSON string is not text (a \\ud800 escape without its pair, which no tokenizer takes), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds an unpaired surrogate escape (\\u{ord(value[e.start]):04x}) at character {e.start + 1}; "
                "escape the whole character (both halves of the pair) or write it as UTF-8")
    return None


def _alpaca(row: dict, errs: list) -> list[Message]:
    instruction = _text(row, "instruction", errs)
    extra = _text(row, "input", errs, required=False) or ""
    output = _text(row, "output", errs)
    system = _text(row, "system", errs, required=False)
    history = row.get("history") or []
    messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    if not isinstance(history, list):
        errs.append(("history", f"must be a list of [question, answer] pairs, got {type(history).__name__}"))
        history = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            errs.append((f"history[{i}]", "must be a [question, answer] pair of strings"))
            continue
        if not pair[0].strip() or not pair[1].strip():
            errs.append((f"history[{i}]", "empty question" if not pair[0].strip() else "empty reply"))
            continue
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # The tutorial concatenates instruction and input; a newline keeps the two apart when both exist.
    prompt = "\n".join(x for x in (instruction, extra) if x)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output or ""}]
    if instruction is not None and not prompt.strip():
        errs.append(("instruction", "empty (and input is empty too)"))
    if output is not None and not output.strip():
        errs.append(("output", "empty reply"))
    return messages


def _turns(row: dict, key: str, role_key: str, text_key: str, errs: list, roles: dict[str, str]) -> list[Message]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        errs.append((key, "missing" if turns is None else "must be a non-empty list"))
        return []
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            errs.append((where, f"must be an object with {role_key!r} and {text_key!r}"))
            continue
        role = _text(turn, role_key, errs, f"{where}.{role_key}")
        content = turn.get(text_key)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            if not all(isinstance(p.get("text"), str) for p in content):
                errs.append((f"{where}.{text_key}", "a text part's \"text\" must be a string"))
                continue
            content = "".join(p["text"] for p in content)  # OpenAI text parts
            turn = {**turn, text_key: content}
        text = _text(turn, text_key, errs, f"{where}.{text_key}")
        if role is None or text is None:
            continue
        if role not in roles:
            errs.append((f"{where}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(sorted(roles))}"))
            continue
        message = {"role": roles[role], "content": text, "_field": where}
        if turn.get("reasoning_content") is not None and roles[role] == "assistant":  # OpenAI's reasoning field
            thought = _text(turn, "reasoning_content", errs, f"{where}.reasoning_content")
            if thought is None:
                continue
            if thought.strip():
                message["reasoning_content"] = thought
        messages.append(message)
    return messages


def _sharegpt(row: dict, errs: list) -> list[Message]:
    messages = _turns(row, "conversations", "from", "value", errs, SHAREGPT_ROLES)
    system = _text(row, "system", errs, required=False)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system, "_field": "system"})
    return messages


def _openai(row: dict, errs: list) -> list[Message]:
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _turns(row, "messages", "role", "content", errs, roles)


def _check_order(messages: list[Message], errs: list, fmt: str) -> None:
    """System first (optional), then user/assistant alternating, ending with a non-empty reply."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        field = m.get("_field", "")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            got = "a system message after the first turn" if m["role"] == "system" else repr(m["role"])
            errs.append((f"{field}.role" if field else "", f"roles out of order: expected {expected!r}, got {got}"))
            return
        if not m["content"].strip() and fmt != "alpaca":  # alpaca names its own fields above
            errs.append((field, "empty reply" if expected == "assistant" else "empty message"))
    if not body or body[-1]["role"] != "assistant":
        errs.append(("", "the conversation must end with an assistant reply"))
    for m in messages:
        m.pop("_field", None)
