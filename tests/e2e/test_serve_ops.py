"""`chatlora serve` run as a service: stopped by SIGTERM or Ctrl-C while streams are running, its
request log, and the addresses and keys it starts with. The real server in a subprocess on loopback,
driven by the openai client and raw HTTP, as in test_serve.py."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import run_cli
from test_serve import KEY, ask, start_server


class Stream(threading.Thread):
    """A streamed request read by the openai client in a thread: `opened` once its first chunk (the
    role, sent before any token) is in, then its text, finish reason, usage or error."""

    def __init__(self, client: openai.OpenAI, i: int, tokens: int):
        super().__init__(daemon=True)
        self.client, self.i, self.tokens = client, i, tokens
        self.opened = threading.Event()
        self.text, self.finish, self.completion_tokens, self.error = "", None, None, None
        self.start()

    def run(self) -> None:
        try:
            for chunk in self.client.chat.completions.create(
                    model="alice", messages=ask(self.i), max_tokens=self.tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                self.opened.set()
                if chunk.choices:
                    self.text += chunk.choices[0].delta.content or ""
                    self.finish = chunk.choices[0].finish_reason or self.finish
                if chunk.usage:
                    self.completion_tokens = chunk.usage.completion_tokens
        except openai.APIError as e:
            self.error = e
        finally:
            self.opened.set()


def stopping(url: str, headers: dict | None = None) -> httpx.Response:
    """A request sent after the signal: the server acts on it within a tick (0.1 s)."""
    for _ in range(50):
        r = httpx.post(f"{url}/chat/completions", json={"model": "alice", "messages": ask(0)}, headers=headers)
        if r.status_code == 503:
            return r
        time.sleep(0.1)
    raise AssertionError(f"still taking requests: {r.status_code} {r.text}")


def test_sigterm_lets_running_streams_finish_then_exits_0(served_runs, tmp_path):
    """Three streams running at SIGTERM each get their whole reply; new requests get 503 meanwhile.
    Also: an empty CHATLORA_API_KEY on loopback serves without a key (it refused to start)."""
    log = tmp_path / "stderr.txt"
    proc, url = start_server(served_runs[:1], log, "--drain-seconds", "120", env={"CHATLORA_API_KEY": ""})
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        streams = [Stream(client, i, tokens=300) for i in range(3)]
        assert all(s.opened.wait(60) for s in streams)
        proc.send_signal(signal.SIGTERM)
        refused = stopping(url)
        assert refused.json()["error"]["code"] == "server_shutting_down" and refused.headers["connection"] == "close"
        for s in streams:
            s.join(120)
            assert s.error is None and s.finish == "length" and s.completion_tokens == 300 and s.text
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    text = log.read_text()
    assert "stopping: 3 request(s) running get up to 120 s to finish" in text and "Traceback" not in text
    assert "Loading weights" not in text, "no progress bar in a server's log"


def test_ctrl_c_ends_streams_left_at_the_drain_time_with_an_error_chunk_and_done(served_runs, tmp_path):
    """Streams still running when --drain-seconds is over end with an error chunk and [DONE] (they
    were cut off mid-chunk); the server exits 0. Its request log has one line per request, with the
    model, tokens and finish reason, and never the API key, wherever a client put it."""
    log = tmp_path / "stderr.txt"
    proc, url = start_server(served_runs[:1], log, "--drain-seconds", "1", "--api-key", KEY, "--max-tokens", "900")
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert httpx.get(f"{url}/models/{KEY}", headers=auth).status_code == 404
        assert httpx.get(f"{url}/models?api_key={KEY}").status_code == 401
        assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        client.chat.completions.create(model="alice", messages=ask(1), max_tokens=5, extra_body={"ignore_eos": True})
        # 900 tokens take the tiny model seconds: both are cut off.
        body = {"model": "alice", "messages": ask(2), "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, headers=auth, timeout=60) as raw:
            lines = raw.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the request is running
            other = Stream(client, 3, tokens=900)
            assert other.opened.wait(60)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        waited = time.monotonic() - stopped
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert rest[-1] == "data: [DONE]" and error["type"] == "server_error"
        assert error["message"] == "the server stopped before this reply was finished (its drain time of 1 s ran out)"
        assert waited < 15, f"the drain of 1 s took {waited:.1f} s"
        other.join(60)
        assert isinstance(other.error, openai.APIError) and "drain time of 1 s ran out" in str(other.error)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and KEY not in text
    assert re.search(r'127\.0\.0\.1:\d+ "POST /v1/chat/completions" 200 model=alice tokens=\d+\+5 finish=length \d+\.\d\ds', text)
    assert len(re.findall(r'"POST /v1/chat/completions" 200 model=alice tokens=\d+\+\d+ finish=error', text)) == 2
    assert re.search(r'"GET /v1/models/\*\*\*" 404 refused=model_not_found', text)
    assert len(re.findall(r'"GET /v1/models" 401', text)) == 2


def test_a_second_ctrl_c_cuts_the_drain_short():
    """The drain's state as the signal handler and uvicorn's ticks drive it (the server's main loop
    calls on_tick every 0.1 s): requests running at the first Ctrl-C go on; a second ends them at
    once, and the command then exits 130 (recipes.serve)."""
    from chatlora.serve.drain import DrainingServer, Gate

    async def app(scope, receive, send) -> None:
        pass

    gate, reasons = Gate(), []
    server = DrainingServer(uvicorn.Config(app), gate, 60, reasons.append)
    gate.active = 2
    assert asyncio.run(server.on_tick(1)) is False and not gate.draining
    server.handle_exit(signal.SIGINT, None)
    assert gate.draining and asyncio.run(server.on_tick(1)) is False and reasons == []
    server.handle_exit(signal.SIGINT, None)
    assert asyncio.run(server.on_tick(1)) is False and server.forced
    assert reasons == ["the server stopped before this reply was finished (a second Ctrl-C)"]
    gate.active = 0  # their error chunks written
    assert asyncio.run(server.on_tick(1)) is True


def test_an_empty_api_key_is_no_key(served_runs):
    """CHATLORA_API_KEY set but empty is no key: fine on loopback (the test above serves so), refused
    with the reason on another address."""
    result = run_cli("serve", str(served_runs[0]), "--host", "0.0.0.0", env={"CHATLORA_API_KEY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to listen on 0.0.0.0 without an API key (the one given is empty)" in result.stderr


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_drain_seconds_exit_2(served_runs, value):
    result = run_cli("serve", str(served_runs[0]), "--drain-seconds", value)
    assert result.returncode == 2 and "--drain-seconds must be a number of seconds, 0 or more" in result.stderr
