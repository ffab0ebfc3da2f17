"""Fit a conversation into `max_length` tokens without losing what is trained.

The tutorial cuts every sample at 384 tokens from the right, which can remove the end-of-turn token
or every trained token. Here, in order: drop the oldest history turns, then trim the end of the last
user message, and only when the reply alone is too long apply the `overlong` policy.
"""

from __future__ import annotations

from collections import Counter

from chatlora.data.render import Renderer, RenderError, Tokenized

# Names of the rules, as counted in the data report.
HISTORY_DROPPED = "history_dropped"
PROMPT_TRIMMED = "prompt_trimmed"
REPLY_DROPPED = "overlong_reply_dropped"
REPLY_TRUNCATED = "overlong_reply_truncated"
REPLY_TOO_LONG = "overlong_reply"


def fit(messages: list[dict], renderer: Renderer, max_length: int, overlong: str, counts: Counter) -> list[tuple[Tokenized, bool]]:
    """The conversation's samples (see Renderer.split), each within max_length, as (sample, cut): cut
    when the reply itself was truncated by policy. `counts` gets each rule used.

    With overlong='error' an overlong reply is counted under REPLY_TOO_LONG and its sample left out;
    the caller turns those into one error listing every such row.
    """
    out = []
    for turns, sample in renderer.split(messages):
        fitted = _fit(messages[: turns[-1] + 1], turns, sample, renderer, max_length, overlong, counts)
        if fitted is not None:
            out.append(fitted)
    return out


def _fit(messages: list[dict], turns: list[int], sample: Tokenized, renderer: Renderer, max_length: int,
         overlong: str, counts: Counter) -> tuple[Tokenized, bool] | None:
    """One sample, whose trained turns are `turns` and whose last message is its last trained reply."""
    if len(sample) <= max_length:
        return sample, False
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    # 1. The oldest user/assistant pairs go first: the last exchange is what the sample is about.
    dropped = 0
    while len(rest) > 2 and len(sample) > max_length:
        rest, dropped = rest[2:], dropped + 2
        kept = [t - dropped for t in turns if t - dropped >= len(system)]
        try:
            sample = renderer.tokenize(system + rest, kept)
        except RenderError:  # the turns no longer share one sequence without their history: the last alone
            sample = renderer.tokenize(system + rest, kept[-1:])
    if dropped:
        counts[HISTORY_DROPPED] += 1
    if len(sample) <= max_length:
        return sample, False
    # 2. Trim the end of the last user message, as far as it takes.
    user, reply = rest[-2], rest[-1]
    last = [len(system) + 1]
    bare = renderer.tokenize(system + [{**user, "content": ""}, reply], last)
    if len(bare) <= max_length:
        tokens = renderer.tokenizer(user["content"], add_special_tokens=False)["input_ids"]
        keep = len(tokens)
        while keep > 0 and len(sample) > max_length:
            keep = max(0, keep - (len(sample) - max_length))
            text = renderer.tokenizer.decode(tokens[:keep])
            sample = renderer.tokenize(system + [{**user, "content": text}, reply], last)
        counts[PROMPT_TRIMMED] += 1
        return sample, False
    # 3. The reply alone does not fit.
    if overlong == "truncate":
        counts[REPLY_TRUNCATED] += 1
        cut = Tokenized(sample.input_ids[:max_length], sample.labels[:max_length])
        return cut, cut.labels[-1] not in renderer.end_ids
    counts[REPLY_DROPPED if overlong == "drop" else REPLY_TOO_LONG] += 1
    return None
