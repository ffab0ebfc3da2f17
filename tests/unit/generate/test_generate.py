"""Streaming and batched replies on the tiny model: the same greedy tokens, stops, sampling seeds,
and the incremental decoding that never splits a character."""

from __future__ import annotations

import pytest

from chatlora.model.from_run import load_run
from chatlora.generate.replies import generate_replies, stream_reply
from chatlora.generate.sampling import Sampling
from chatlora.generate.text import TextStream
from conftest import build_byte_tokenizer

PROMPTS = [[{"role": "user", "content": "Hello there"}], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_run(tiny_run, device="cpu")


def test_stream_gives_the_batched_greedy_reply_piece_by_piece(loaded):
    batched = generate_replies(loaded.model, loaded.renderer, PROMPTS, Sampling(max_new_tokens=24))
    for messages, expected in zip(PROMPTS, batched):
        stream = stream_reply(loaded.model, loaded.renderer, messages, Sampling(max_new_tokens=24))
        pieces = list(stream)
        assert len(pieces) > 3, "text arrives as it is generated, not at the end"
        assert stream.reply.ids == expected.ids
        assert stream.reply.text == expected.text and "".join(pieces).strip() == expected.text
        assert stream.reply.stopped is expected.stopped is False and stream.reply.tokens == 24
        assert stream.prompt_tokens == len(loaded.renderer.prompt_ids(messages))


def test_replies_stop_on_a_stop_token(loaded):
    """Make a greedy token that is new at position k a stop token: both paths end there, without it."""
    model, renderer = loaded.model, loaded.renderer
    free = stream_reply(model, renderer, PROMPTS[0], Sampling(max_new_tokens=16))
    list(free)
    k = next(i for i, t in enumerate(free.reply.ids) if i > 0 and t not in free.reply.ids[:i])
    stop = free.reply.ids[k]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [256, stop]
    try:
        stream = stream_reply(model, renderer, PROMPTS[0], Sampling(max_new_tokens=8))
        list(stream)
        (batched,) = generate_replies(model, renderer, PROMPTS[:1], Sampling(max_new_tokens=8))
    finally:
        model.generation_config.eos_token_id = old
    for reply in (stream.reply, batched):
        assert reply.stopped and reply.ids == free.reply.ids[:k] and reply.tokens == k + 1
        assert reply.text == renderer.tokenizer.decode(free.reply.ids[:k]).strip()


def test_sampling_is_repeatable_with_a_seed(loaded):
    def sample(seed):
        return "".join(stream_reply(loaded.model, loaded.renderer, PROMPTS[0], Sampling(16, temperature=1.0, top_p=0.95, seed=seed)))

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1
    greedy = generate_replies(loaded.model, loaded.renderer, PROMPTS, Sampling(16))
    sampled = generate_replies(loaded.model, loaded.renderer, PROMPTS, Sampling(16, temperature=1.0, seed=5))
    assert sampled == generate_replies(loaded.model, loaded.renderer, PROMPTS, Sampling(16, temperature=1.0, seed=5))
    assert [r.ids for r in sampled] != [r.ids for r in greedy]


def test_closing_a_stream_stops_it(loaded):
    stream = stream_reply(loaded.model, loaded.renderer, PROMPTS[0], Sampling(max_new_tokens=50))
    next(iter(stream))
    stream.close()
    assert list(stream) == [] and len(stream.ids) < 50


def test_incremental_text_never_splits_a_character():
    tok = build_byte_tokenizer()  # one token per byte: 中 is three tokens
    ids = tok("  Hi 中文!", add_special_tokens=False)["input_ids"]
    text = TextStream(tok)
    pieces = [text.push(i) for i in ids] + [text.finish()]
    assert "".join(pieces) == "Hi 中文!"  # leading spaces dropped, as in Reply.text
    assert "中" in pieces and "文" in pieces and not any("\ufffd" in p for p in pieces)
    half = TextStream(tok)
    assert [half.push(i) for i in "中".encode()[:2]] == ["", ""]
    assert set(half.finish()) == {"\ufffd"}  # a reply cut inside a character still shows that something came
