"""Truncation keeps supervision: history goes first, then the prompt's end, then the overlong policy."""

from __future__ import annotations

from collections import Counter

from chatlora.data.render import IGNORE, Renderer
from chatlora.data.truncate import HISTORY_DROPPED, PROMPT_TRIMMED, REPLY_DROPPED, REPLY_TOO_LONG, REPLY_TRUNCATED
from chatlora.data.truncate import fit as fit_all
from conftest import build_byte_tokenizer

EOT = 256


def fit(messages, r, max_length, overlong, counts):
    """The one sample of a ChatML conversation (None when dropped)."""
    samples = fit_all(messages, r, max_length, overlong, counts)
    assert len(samples) <= 1
    return samples[0][0] if samples else None


def setup():
    return Renderer(build_byte_tokenizer(), {EOT}), Counter()


def conv(*turns: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_short_samples_are_untouched():
    r, counts = setup()
    messages = conv("hi", "hello")
    assert fit(messages, r, 100, "drop", counts).input_ids == r.tokenize(messages).input_ids
    assert not counts


def test_oldest_history_is_dropped_first():
    r, counts = setup()
    messages = conv("old question " * 5, "old answer " * 5, "mid q", "mid a", "last q", "last a", system="sys")
    limit = len(r.tokenize(conv("mid q", "mid a", "last q", "last a", system="sys")))
    sample = fit(messages, r, limit, "drop", counts)
    assert sample.input_ids == r.tokenize(conv("mid q", "mid a", "last q", "last a", system="sys")).input_ids
    assert counts == {HISTORY_DROPPED: 1}


def test_then_the_end_of_the_prompt_is_trimmed_and_the_reply_kept_whole():
    r, counts = setup()
    messages = conv("x" * 200, "the reply", system="sys")
    sample = fit(messages, r, 80, "drop", counts)
    assert len(sample) <= 80
    text = r.tokenizer.decode(sample.input_ids)
    assert "sys" in text and text.endswith("the reply<|im_end|>")
    assert "x" * 10 in text  # the start of the user message stays
    assert sample.labels[-1] == EOT
    assert counts == {PROMPT_TRIMMED: 1}


def test_overlong_reply_policies():
    messages = conv("q", "y" * 300)
    r, counts = setup()
    assert fit(messages, r, 64, "drop", counts) is None and counts == {REPLY_DROPPED: 1}
    r, counts = setup()
    cut = fit(messages, r, 64, "truncate", counts)
    assert len(cut) == 64 and counts == {REPLY_TRUNCATED: 1}
    assert cut.labels[-1] != EOT and any(label != IGNORE for label in cut.labels)
    r, counts = setup()
    assert fit(messages, r, 64, "error", counts) is None and counts == {REPLY_TOO_LONG: 1}
