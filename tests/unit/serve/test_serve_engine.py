"""The serving engine in process: whatever fails for one request ends that request alone, and the
engine's thread serves the next ones. The real server, driven by clients: e2e/test_serve.py."""

from __future__ import annotations

import queue

import pytest


def ask(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a gardener."},
            {"role": "user", "content": f"Plant number {i}?" + " Tell me more." * (i % 4)}]


def reply_events(engine, model: str, messages: list[dict], params, emit=None, timeout: float = 30) -> list:
    """A request's events, with a timeout (a dead engine thread never answers)."""
    events: queue.Queue = queue.Queue()

    def both(event) -> None:
        events.put(event)
        if emit is not None:
            emit(event)

    engine.submit(model, messages, params, both)
    got = [events.get(timeout=timeout)]
    while not got[-1].done:
        got.append(events.get(timeout=timeout))
    return got


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_failing_request_ends_alone_and_the_engine_goes_on(served_runs, decode):
    """Whatever fails for one request (here: a Row that cannot be made, a callback that raises) ends
    that request with an error event; the engine's thread serves the next ones. Both workers: the
    batch loop (eager) and continuous batching (static cache)."""
    from chatlora.generate.engine import Engine
    from chatlora.serve.params import request_sampling

    engine = Engine.from_runs(served_runs[:1], "cpu", decode, max_context=256, max_tokens=8, max_batch=4)
    try:
        assert (engine.decoder is None) == (decode == "eager")
        # Past request_sampling's own check, as only a bug could get it: torch's generator refuses this seed.
        bad_seed = request_sampling(max_tokens=4, temperature=0.8)
        object.__setattr__(bad_seed, "seed", 2**64)
        events = reply_events(engine, "alice", ask(0), bad_seed)
        assert events[-1].finish_reason == "error" and "Overflow" in events[-1].error

        def broken(event) -> None:
            raise RuntimeError("the client's callback broke")

        events = reply_events(engine, "alice", ask(1), request_sampling(max_tokens=4, temperature=0), emit=broken)
        assert events[-1].finish_reason == "error" and "callback broke" in events[-1].error
        for model in engine.names:
            events = reply_events(engine, model, ask(2), request_sampling(max_tokens=4, temperature=0.7, seed=3))
            assert events[-1].finish_reason in ("stop", "length") and events[-1].error is None
        assert engine._thread.is_alive()
    finally:
        engine.close()
