"""The generation engine on the tiny model: replies equal transformers' generate, batched equals
alone (greedy and seeded sampling), stop strings, cancel, limits. No HTTP here: see test_serve.py."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from chatlora.generate.engine import Engine
from chatlora.generate.events import RequestError
from chatlora.generate.sampling import Sampling
from chatlora.generate.text import TextStream
from chatlora.serve.params import request_sampling

GREEDY = request_sampling(max_tokens=24, temperature=0)


def conversation(i: int) -> list[dict]:
    # Prompts of different lengths, so batched rows really are left-padded.
    return [{"role": "user", "content": f"Question {i}: what grows in the shade?" + " really" * (i % 5)}]


@pytest.fixture(scope="module")
def engine(served_runs):
    engine = Engine.from_runs(served_runs, "cpu", max_tokens=512)
    yield engine
    engine.close()


def concurrently(engine: Engine, jobs: list[tuple[str, list[dict], Sampling]]) -> list[tuple]:
    """Submit every job at once from its own thread, as concurrent HTTP requests do."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        results[i] = engine.complete(*jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture(scope="module")
def reference(served_runs):
    """The same runs loaded again for transformers' generate: the engine's model belongs to its thread
    (it switches adapters there), so nothing else may use it."""
    from chatlora.model.from_run import load_run

    return load_run(served_runs[0], "cpu", extra_runs=served_runs[1:]).model


@pytest.mark.parametrize("model", ["alice", "bob", "base"])
def test_greedy_reply_equals_transformers_generate(engine, reference, model):
    """Our token loop (left padding, position ids, KV cache) gives generate's tokens, one by one."""
    base = model == "base"
    model = engine.base_name if base else model
    for i in range(3):
        prompt = engine.prompt(conversation(i))
        ids = torch.tensor([prompt])
        if not base:
            reference.set_adapter(model)
        with reference.disable_adapter() if base else contextlib.nullcontext():
            out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        text, last, tokens = engine.complete(model, conversation(i), GREEDY)
        assert tokens == expected[: len(tokens)] and len(tokens) == len(expected)
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(tokens)


def test_batched_replies_equal_replies_alone(engine):
    """Greedy and seeded-sampled requests of three models at once: each reply is the one it gets alone."""
    jobs = []
    for i in range(12):
        params = GREEDY if i % 2 == 0 else request_sampling(max_tokens=24, temperature=0.9, top_p=0.9, seed=100 + i)
        jobs.append((engine.names[i % 3], conversation(i), params))
    alone = [engine.complete(*job) for job in jobs]
    before = engine.stats.largest_batch
    together = concurrently(engine, jobs)
    assert [r[2] for r in together] == [r[2] for r in alone]
    assert [r[0] for r in together] == [r[0] for r in alone]
    assert engine.stats.largest_batch > max(before, 1), "the concurrent requests were batched"
    assert len({r[0] for r in alone}) > 6, "different prompts and seeds give different replies"


def test_seeded_sampling_is_reproducible(engine):
    params = request_sampling(max_tokens=24, temperature=1.0, seed=7)
    first = engine.complete(engine.base_name, conversation(1), params)[2]
    assert engine.complete(engine.base_name, conversation(1), params)[2] == first
    other = request_sampling(max_tokens=24, temperature=1.0, seed=8)
    assert engine.complete(engine.base_name, conversation(1), other)[2] != first


def test_stop_string_cuts_the_reply(engine):
    text, last, _ = engine.complete(engine.base_name, conversation(2), request_sampling(max_tokens=40, temperature=0))
    assert last.finish_reason == "length" and len(text) > 8
    stop = text[5:8]
    cut, last, _ = engine.complete(engine.base_name, conversation(2), request_sampling(max_tokens=40, temperature=0, stop=("zzzz", stop)))
    assert cut == text[: text.index(stop)] and last.finish_reason == "stop"


def test_closing_the_stream_cancels_the_generation(engine):
    before = engine.stats.tokens, engine.stats.cancelled
    stream = engine.stream(engine.base_name, conversation(3), request_sampling(max_tokens=500, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    for _ in range(200):
        if engine.stats.running == 0 and engine.stats.cancelled > before[1]:
            break
        threading.Event().wait(0.01)
    assert engine.stats.cancelled == before[1] + 1
    assert engine.stats.tokens - before[0] < 250, "the generation stopped long before max_tokens"
    # The engine goes on serving.
    assert engine.complete("alice", conversation(0), GREEDY)[1].finish_reason in ("stop", "length")


def test_limits_and_unknown_models_are_request_errors(engine):
    with pytest.raises(RequestError, match="does not exist") as e:
        engine.submit("carol", conversation(0), GREEDY, print)
    assert e.value.status == 404
    with pytest.raises(RequestError, match="at most 512"):
        engine.submit("alice", conversation(0), request_sampling(max_tokens=513), print)
    long = [{"role": "user", "content": "x" * 1000}]
    with pytest.raises(RequestError, match="context is 1024 tokens") as e:
        engine.submit("alice", long, request_sampling(max_tokens=100), print)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="temperature"):
        request_sampling(temperature=3)
    # No max_tokens: as many as the context leaves, within the server's limit.
    _, last, _ = engine.complete(engine.base_name, long, request_sampling(temperature=0, ignore_eos=True))
    assert last.finish_reason == "length" and last.usage.total_tokens == 1024


def test_text_stream_holds_back_partial_characters_and_stop_strings(byte_tokenizer):
    """Byte tokens: "é" is two tokens, and a stop string may arrive split over several."""
    text = "  Bonjour é! END and more"
    stream = TextStream(byte_tokenizer, stop=("END",))
    pieces = [stream.push(t) for t in byte_tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(stream.finish())
    assert "".join(pieces) == "Bonjour é! " and stream.stopped
    assert all("\ufffd" not in p for p in pieces), "no half character is ever handed out"
    assert "E" not in "".join(pieces[:-1]) and pieces.count("") > 3
    plain = TextStream(byte_tokenizer)
    out = "".join(plain.push(t) for t in byte_tokenizer("EN", add_special_tokens=False)["input_ids"]) + plain.finish()
    assert out == "EN"


def test_closing_the_engine_ends_running_and_new_requests(served_runs):
    engine = Engine.from_runs(served_runs[:1], "cpu")
    events = engine.stream(engine.base_name, conversation(0), request_sampling(max_tokens=900, temperature=0, ignore_eos=True))
    next(events)
    engine.close()
    last = list(events)[-1]
    assert last.finish_reason == "error" and "shutting down" in last.error
    assert last.usage.completion_tokens < 900
    with pytest.raises(RequestError, match="shutting down"):
        engine.submit("alice", conversation(0), GREEDY, print)


def test_runs_are_named_by_their_folders(served_runs, monkeypatch):
    from chatlora.errors import ChatloraError

    with pytest.raises(ChatloraError, match="same folder name"):
        Engine.from_runs([served_runs[0], served_runs[0]])
    monkeypatch.chdir(served_runs[0])
    engine = Engine.from_runs([".", served_runs[1]], "cpu")
    try:
        assert engine.names[:2] == ["alice", "bob"]
    finally:
        engine.close()
