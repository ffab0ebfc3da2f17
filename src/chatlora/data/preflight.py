"""The pre-flight: what the model will see and learn, checked before any weight is loaded.

Hard failures are the mistakes that silently ruin a run: samples with nothing to learn, replies whose
trained span does not end on the token generation stops on (the model never learns to stop), a pad
token equal to that token, and a generation config that does not stop on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from chatlora.data.render import IGNORE

GREEN, RESET = "\033[32m", "\033[0m"


@dataclass
class Preflight:
    summary: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id))


def sample_sizes(dataset) -> tuple[list[int], list[int]]:
    """Each sample's length and trained tokens, computed chunk by chunk on the Arrow columns (zero-copy
    where memory-mapped): a streamed split may hold more tokens than Python lists of them would fit."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    trained: list[int] = []
    for chunk in dataset.data.column("labels").chunks:
        if len(chunk) == 0:
            continue
        offsets = np.asarray(chunk.offsets)
        mask = np.asarray(chunk.values.slice(offsets[0], offsets[-1] - offsets[0])) != IGNORE
        cumulative = np.concatenate([[0], np.cumsum(mask)])
        trained += (cumulative[offsets[1:] - offsets[0]] - cumulative[offsets[:-1] - offsets[0]]).tolist()
    return lengths, trained


def check(dataset, tokenizer, stop_ids: list[int], end_of_turn: int | None) -> Preflight:
    """Check every sample of a tokenized split (input_ids, labels, origin, cut)."""
    out = Preflight()
    eot = token_text(tokenizer, end_of_turn) if end_of_turn is not None else None
    if end_of_turn is None:
        out.failures.append(
            "the chat template ends an assistant turn with no end-of-turn token chatlora knows; "
            "set model.stop_tokens=[<the token>] so it is trained and generation stops on it"
        )
    elif end_of_turn not in stop_ids:
        stops = ", ".join(token_text(tokenizer, i) for i in stop_ids) or "nothing"
        out.failures.append(
            f"the chat template ends replies with {eot} but the model's generation config stops on {stops}: "
            f"a trained model would talk on past its reply. Add model.stop_tokens=[\"{eot}\"]"
        )
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id in (end_of_turn, tokenizer.eos_token_id):
        out.failures.append(
            f"the pad token {tokenizer.pad_token} is the end-of-turn token: a collator that masks padding "
            "would never train the model to stop. Give the tokenizer another pad token"
        )
    empty, unstopped, past = [], [], []
    # The end-of-turn and eos tokens: a trained one before the end of its reply means the reply holds
    # it as text (or the template writes more after it). Other stop tokens (model.stop_tokens) may be
    # ordinary text a reply contains.
    stops = {end_of_turn, tokenizer.eos_token_id} - {None}
    # A Dataset in batches (a streamed split may not fit in memory as Python lists); a dict of columns whole.
    columns = ["labels", "origin", "cut"]
    batches = dataset.select_columns(columns).iter(batch_size=1024) if hasattr(dataset, "select_columns") else [dataset]
    for batch in batches:
        for labels, origin, cut in zip(batch["labels"], batch["origin"], batch["cut"]):
            trained = [t for t in labels if t != IGNORE]
            if not trained:
                empty.append(origin)
            elif not cut and trained[-1] not in stop_ids:
                unstopped.append(f"{origin} (ends on {token_text(tokenizer, trained[-1])!r})")
            if any(t in stops and k + 1 < len(labels) and labels[k + 1] != IGNORE for k, t in enumerate(labels)):
                past.append(origin)
    if empty:
        out.failures.append(f"{len(empty)} sample(s) have no trained token: {_few(empty)}")
    if past:
        out.failures.append(f"{len(past)} sample(s) train tokens after a token generation stops on (a reply holds the "
                            f"end-of-turn token as text, or the template writes more after it): {_few(past)}")
    if unstopped and end_of_turn in stop_ids:
        out.failures.append(f"{len(unstopped)} sample(s) end their trained span on a token generation does not stop on: {_few(unstopped)}")
    return out


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of sample lengths in tokens."""
    if not lengths:
        return ["  (no samples)"]
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // step)] += 1
    top = max(counts)
    rows = []
    for i, c in enumerate(counts):
        start = lo + i * step
        if start > hi:
            break
        bar = "#" * max(1 if c else 0, round(width * c / top))
        rows.append(f"  {start:>6}-{min(hi, start + step - 1):<6} {c:>6}  {bar}")
    return rows


def show_sample(input_ids: list[int], labels: list[int], tokenizer, color: bool | None = None) -> str:
    """The rendered sample, trained tokens in green on a terminal and inside [[ ]] otherwise."""
    color = sys.stdout.isatty() if color is None else color
    parts, current, trained = [], [], False
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE
        if is_trained != trained and current:
            parts.append((trained, tokenizer.decode(current)))
            current = []
        trained = is_trained
        current.append(token)
    if current:
        parts.append((trained, tokenizer.decode(current)))
    if color:
        return "".join(f"{GREEN}{text}{RESET}" if t else text for t, text in parts)
    return "".join(f"[[{text}]]" if t else text for t, text in parts)
