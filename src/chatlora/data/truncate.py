"""Fit a conversation into `max_length` tokens without losing what is trained.

The tutorial cuts every sample at 384 tokens from the right, which can remove the end-of-turn token
or every trained token. Here, in order: drop the oldest history turns, then trim the end of the last
user message, and only when the reply alone is too long apply the `overlong` policy.
"""

from __future__ import annotations

from collections import Counter

from chatlora.data.render import Renderer, Tokenized

# Names of the rules, as counted in the data report.
HISTORY_DROPPED = "history_dropped"
PROMPT_TRIMMED = "prompt_trimmed"
REPLY_DROPPED = "overlong_reply_dropped"
REPLY_TRUNCATED = "overlong_reply_truncated"
REPLY_TOO_LONG = "overlong_reply"


def fit(messages: list[dict], renderer: Renderer, max_length: int, overlong: str, counts: Counter) -> Tokenized | None:
    """The tokenized conversation within max_length, or None when dropped. `counts` gets each rule used.

    With overlong='error' an overlong reply is counted under REPLY_TOO_LONG and None returned; the
    caller turns those into one error listing every such row.
    """
    sample = renderer.tokenize(messages)
    if len(sample) <= max_length:
        return sample
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    # 1. The oldest user/assistant pairs go first: the last exchange is what the sample is about.
    dropped = False
    while len(turns) > 2 and len(sample) > max_length:
        turns = turns[2:]
        sample = renderer.tokenize(system + turns)
        dropped = True
    if dropped:
        counts[HISTORY_DROPPED] += 1
    if len(sample) <= max_length:
        return sample
    # 2. Trim the end of the last user message, as far as it takes.
    user, reply = turns[-2], turns[-1]
    bare = renderer.tokenize(system + [{**user, "content": ""}, reply])
    if len(bare) <= max_length:
        tokens = renderer.tokenizer(user["content"], add_special_tokens=False)["input_ids"]
        keep = len(tokens)
        while keep > 0 and len(sample) > max_length:
            keep = max(0, keep - (len(sample) - max_length))
            text = renderer.tokenizer.decode(tokens[:keep])
            sample = renderer.tokenize(system + [{**user, "content": text}, reply])
        counts[PROMPT_TRIMMED] += 1
        return sample
    # 3. The reply alone does not fit.
    if overlong == "truncate":
        counts[REPLY_TRUNCATED] += 1
        return Tokenized(sample.input_ids[:max_length], sample.labels[:max_length])
    counts[REPLY_DROPPED if overlong == "drop" else REPLY_TOO_LONG] += 1
    return None
