"""The chat page's parts in process: a reply stopped on the page stops in the engine, and a missing
Streamlit is reported before the model loads. The page in a browser: e2e/test_web.py."""

from __future__ import annotations

import sys
import time

import pytest

from conftest import free_port


def test_a_reply_stopped_on_the_page_stops_in_the_engine(served_runs):
    """Reply.cancel, which the page calls however its script run ends, stops the generation at the
    next token; the page's history then leaves out an exchange whose reply has no text."""
    from chatlora.generate.engine import Engine
    from chatlora.serve.page import Reply, refusal, sendable
    from chatlora.generate.events import RequestError
    from chatlora.serve.params import request_sampling

    engine = Engine.from_runs(served_runs[:1], "cpu", "eager", max_tokens=900)
    try:
        params = request_sampling(max_tokens=900, temperature=0, ignore_eos=True)
        reply = Reply(engine, "alice", [{"role": "user", "content": "Hello"}], params)
        pieces = reply.pieces()
        while not reply.text:
            next(pieces)
        reply.cancel()
        for _ in range(200):
            if engine.stats.cancelled == 1 and engine.stats.running == 0:
                break
            time.sleep(0.05)
        assert engine.stats.cancelled == 1 and engine.stats.finished == 0 and engine.stats.tokens < 900

        turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "", "note": "stopped before the end"},
                 {"role": "user", "content": "d"}, {"role": "assistant", "content": "e", "note": "3 tokens in 0.1 s"}]
        assert sendable(turns) == [{"role": r, "content": c} for r, c in zip("user assistant user assistant".split(), "abde")]

        long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 200} for i in range(7)]
        with pytest.raises(RequestError) as e:
            Reply(engine, "alice", long_chat, request_sampling(max_tokens=256))
        why = refusal(e.value, engine, long_chat, request_sampling(max_tokens=256))
        assert why.startswith("Not sent: the conversation has grown too long for the model, which reads 1024 tokens")
        assert "Clear history to start a new conversation" in why
    finally:
        engine.close()


def test_missing_streamlit_is_reported_before_the_model_loads(served_runs, monkeypatch, capsys):
    """The page's script imported Streamlit only after the engine had loaded the model (minutes for a
    7B model) to say it was missing."""
    from chatlora.cli import main
    from chatlora.generate.engine import Engine

    for name in ("streamlit", "streamlit.web", "streamlit.web.bootstrap"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before Streamlit was checked")

    monkeypatch.setattr(Engine, "from_runs", loaded)
    assert main(["web", str(served_runs[0]), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "the chat page needs Streamlit" in err and "pip install 'chatlora[web]'" in err
