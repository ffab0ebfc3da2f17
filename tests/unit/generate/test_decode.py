"""The fast decode path on the tiny model (CPU, static cache without graphs; the CUDA graphs replay
the same step, see gpu/test_gpu.py): greedy replies equal transformers' generate token for token, alone,
when rows join and leave, and when the cache shifts; chat and the engine use it."""

from __future__ import annotations

import threading

import pytest
import torch

from chatlora.errors import ChatloraError
from chatlora.generate.decode import StaticDecoder, fast_decoder, parity, resolve_mode
from chatlora.generate.engine import Engine
from chatlora.serve.params import request_sampling
from decoding import PROMPTS, greedy_rows


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def expected(model) -> list[list[int]]:
    """transformers' generate, greedy, 30 new tokens, each prompt alone."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
        out.append(gen[0, len(p):].tolist())
    return out


def greedy(decoder: StaticDecoder, prompt: list[int], tokens: int) -> list[int]:
    decoder.reset()
    logits, out = decoder.add(prompt), []
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        logits = decoder.step([out[-1]])[0]
    return out


def test_greedy_alone_equals_generate(model, expected):
    decoder = StaticDecoder(model, slots=2, columns=256, mode="static")
    for prompt, want in zip(PROMPTS, expected):
        assert greedy(decoder, prompt, 30) == want


def test_rows_that_join_leave_and_shift_equal_generate(model, expected):
    """Four rows joining at different steps in a cache of 52 columns: prompts land left of the write
    column, finished rows leave, the cache shifts when the column reaches the end."""
    decoder = StaticDecoder(model, slots=3, columns=52, mode="static")
    joins = {0: 0, 2: 1, 9: 2, 31: 3}  # step -> prompt; the fourth joins when a slot is free again
    out, shifted = greedy_rows(decoder, joins, limits={i: 30 for i in range(4)})
    assert shifted, "the cache never shifted: the test did not test that"
    assert [out[i] for i in range(4)] == [e[:30] for e in expected]


def test_parity_check_and_modes(model):
    decoder = StaticDecoder(model, slots=1, columns=128, mode="static")
    assert parity(decoder) < 1e-4
    assert resolve_mode("auto", "cpu") == "eager" and resolve_mode("static", "cpu") == "static"
    with pytest.raises(ChatloraError, match="needs a CUDA device"):
        resolve_mode("graphs", "cpu")
    assert fast_decoder(model, "eager") is None
    lines = []
    assert fast_decoder(model, "static", columns=64, echo=lines.append).columns == 64
    assert "decode: static" in lines[0]


def test_chat_stream_uses_the_decoder_and_gives_the_same_reply(tiny_run):
    from chatlora.generate.replies import generate_replies, stream_reply
    from chatlora.generate.sampling import Sampling
    from chatlora.recipes.chat import load_for_chat

    loaded = load_for_chat(str(tiny_run), device="cpu", decode="static")
    assert loaded.decoder is not None and loaded.decoder.columns <= 1024
    messages = [{"role": "user", "content": "Hello there"}]
    (want,) = generate_replies(loaded.model, loaded.renderer, [messages], Sampling(max_new_tokens=24))
    stream = stream_reply(loaded.model, loaded.renderer, messages, Sampling(max_new_tokens=24), decoder=loaded.decoder)
    assert stream.decoder is loaded.decoder
    assert "".join(stream).strip() == want.text and stream.reply.ids == want.ids


def test_engine_batches_continuously_with_replies_equal_alone(served_runs):
    """Requests of three models, greedy and seeded sampling, arriving while others run: each reply is
    the one it gets alone, and later requests joined a running batch."""
    engine = Engine.from_runs(served_runs, "cpu", decode="static", max_context=256, max_tokens=64, max_batch=4)
    try:
        assert engine.decoder is not None and engine.context == 256
        jobs = []
        for i in range(9):
            params = request_sampling(max_tokens=12 + 4 * (i % 3), temperature=0 if i % 2 == 0 else 0.9, seed=50 + i)
            jobs.append((engine.names[0 if i < 6 else i % 3], [{"role": "user", "content": f"Question {i}?" + " more" * (i % 4)}], params))
        alone = [engine.complete(*job)[2] for job in jobs]
        results: list = [None] * len(jobs)
        # A long reply runs while the others arrive: they must join its batch, not wait for its end.
        holder = engine.stream(engine.names[0], [{"role": "user", "content": "Hold on"}],
                               request_sampling(max_tokens=64, temperature=0, ignore_eos=True))
        next(holder)

        def one(i: int) -> None:
            threading.Event().wait(0.02 * i)  # staggered: most arrive while others are generating
            results[i] = engine.complete(*jobs[i])[2]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert list(holder)[-1].usage.completion_tokens == 64
        assert results == alone
        assert engine.stats.largest_batch >= 3
        with pytest.raises(Exception, match="--max-context"):
            engine.submit("alice", [{"role": "user", "content": "x" * 300}], request_sampling(max_tokens=10), print)
    finally:
        engine.close()


def test_a_long_prompt_joining_early_moves_the_others_right(model):
    """A short row runs; a prompt longer than the write column joins (the short row moves right), and
    later the cache shifts left while the short row still lives."""
    want = {}
    for i, tokens in ((0, 45), (2, 30)):
        ids = torch.tensor([PROMPTS[i]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
        want[i] = gen[0, len(PROMPTS[i]):].tolist()
    decoder = StaticDecoder(model, slots=2, columns=52, mode="static")
    out, shifted = greedy_rows(decoder, joins={0: 0, 3: 2}, limits={0: 45, 2: 30}, steps=100)
    assert shifted and out == want
