"""`chatlora serve` as users run it: the real server on a free loopback port, driven by the official
`openai` client (and raw HTTP where a client cannot misbehave on purpose)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import run_cli

KEY = "test-key"
# One torch thread: the tiny model gains nothing from more, and on 2 busy cores (CI) torch's spinning
# worker threads starve the server's event loop and this test's clients (10x slower load test).
SERVER_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start_server(runs, log: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`chatlora serve RUNS --port 0 FLAGS` in a subprocess, its stderr to `log`; returns it and its base
    URL (…/v1), read from the address line it prints once the model is loaded and the port bound."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "chatlora", "serve", *map(str, runs), "--port", "0", *flags],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **SERVER_ENV, **(env or {})})
    for line in proc.stdout:
        if "serving the OpenAI API at " in line:
            return proc, line.split(" at ")[1].split()[0]
    proc.kill()
    raise AssertionError(f"the server did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def server_and_log(served_runs, tmp_path_factory):
    """`chatlora serve alice bob --port 0` in a subprocess; yields its base URL (…/v1) and its stderr file."""
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    proc, url = start_server(served_runs, log, "--api-key", KEY, "--max-tokens", "900", "--max-body", "100000")
    yield url, log
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=60) == 0  # Ctrl-C with nothing running: a clean stop
    finally:
        proc.kill()
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def server(server_and_log):
    return server_and_log[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_name(client):
    return [m.id for m in client.models.list()][-1]


def health(server: str) -> dict:
    return httpx.get(server.removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()


def ask(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a gardener."},
            {"role": "user", "content": f"Plant number {i}?" + " Tell me more." * (i % 4)}]


def test_models_are_the_runs_and_the_base_model(client, base_name):
    assert [m.id for m in client.models.list()] == ["alice", "bob", base_name]
    assert base_name.startswith("tiny-llama")
    assert client.models.retrieve("bob").id == "bob"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("carol")


def test_plain_completion_with_usage(client, base_name):
    reply = client.chat.completions.create(model=base_name, messages=ask(1), max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == base_name
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 8
    # Byte tokens: one per byte of the ChatML text, one per special token.
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ask(1)) + "<|im_start|>assistant\n"
    specials = {"<|im_start|>": chatml.count("<|im_start|>"), "<|im_end|>": chatml.count("<|im_end|>")}
    assert reply.usage.prompt_tokens == len(chatml.encode()) - sum((len(s) - 1) * n for s, n in specials.items())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_streamed_reply_equals_the_plain_one(client):
    kwargs = dict(model="alice", messages=ask(2), max_tokens=20, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "bob", "messages": ask(3), "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_seed_temperature_and_top_p(client, base_name):
    text = client.chat.completions.create(model=base_name, messages=ask(4), max_tokens=30, temperature=0).choices[0].message.content
    stop = text[4:7]
    cut = client.chat.completions.create(model=base_name, messages=ask(4), max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    def sample(seed: int) -> str:
        return client.chat.completions.create(model=base_name, messages=ask(4), max_tokens=30, temperature=1.2,
                                              top_p=0.95, seed=seed).choices[0].message.content

    assert sample(1) == sample(1) != sample(2)


BAD_BODIES = {
    "max_tokens is a string": ({"max_tokens": "ten"}, 400, "max_tokens"),
    "negative max_tokens": ({"max_tokens": -5}, 400, "max_tokens"),
    "max_tokens over the limit": ({"max_tokens": 5000}, 400, "at most 900"),
    "temperature is a string": ({"temperature": "hot"}, 400, "temperature"),
    "temperature too high": ({"temperature": 9}, 400, "temperature"),
    "stream is a string": ({"stream": "yes"}, 400, "stream"),
    "content is a number": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "ends with the assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "last message"),
    "five stop strings": ({"stop": list("abcde")}, 400, "stop"),
    "seed over 64 bits": ({"seed": 2**64}, 400, "seed"),
    "n=2": ({"n": 2}, 400, "n: this server supports only 1, not 2"),
    "JSON mode": ({"response_format": {"type": "json_object"}}, 400, 'supports only {"type": "text"}, not {"type": "json_object"}'),
    "tool calls required": ({"tool_choice": "required"}, 400, 'supports only "none" or "auto", not "required"'),
    "logit_bias": ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, 400, "stream_options: only allowed when stream is true"),
    "an image part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                                 {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]},
                      400, "messages.0.content: part 1: images are not supported by this server, only text parts"),
    "stop is a number": ({"stop": 5}, 400, "stop: must be a string or a list of up to 4 non-empty strings, got an integer"),
    "content is null": ({"messages": [{"role": "user", "content": None}]}, 400, "must be a string or a list of text parts"),
    "a message is a string": ({"messages": ["hi"]}, 400, "messages.0: must be a JSON object, got a string"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "context is 1024"),
    "huge body": ({"messages": [{"role": "user", "content": "x" * 200_000}]}, 413, "larger than"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_openai_shaped_4xx(client, case):
    change, status, words = BAD_BODIES[case]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**{"model": "alice", "messages": ask(0), "max_tokens": 5, **change})
    assert e.value.status_code == status
    assert set(e.value.body) >= {"message", "type", "param", "code"} and words in e.value.body["message"] + str(e.value.body["param"])
    if status == 400 and len(change) == 1 and next(iter(change)) not in ("messages",):
        assert e.value.body["param"] == next(iter(change)), "param names the field, as OpenAI's errors do"
    param = e.value.body["param"]
    assert not param or not e.value.body["message"].startswith(f"{param}: {param}"), "the field is named once"
    assert "Input should be a valid" not in e.value.body["message"], "JSON types, not pydantic's words"


def test_what_pydantic_and_fastapi_said_is_said_in_json_terms(server):
    """Bodies no client library sends but curl and hand-written clients do: each refusal says what
    is wrong with the body, not what went wrong inside the server."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def refusal(body: bytes) -> dict:
        r = httpx.post(f"{server}/chat/completions", content=body, headers=headers)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    # A lone surrogate escape: valid JSON, but not text (the tokenizer's own error said "TextEncodeInput
    # must be Union[...]"; in the model name it was a 500, the error body not being writable as UTF-8).
    content = refusal(b'{"model": "alice", "messages": [{"role": "user", "content": "Hi \\ud800 there"}]}')
    assert content["param"] == "messages.0.content"
    assert content["message"].startswith("messages.0.content: holds an unpaired surrogate escape (\\ud800) at character 4")
    model = refusal(b'{"model": "al\\udc00", "messages": [{"role": "user", "content": "Hi"}]}')
    assert model["param"] == "model" and "unpaired surrogate" in model["message"]
    assert refusal(b'{"model": "alice", "stop": ["\\ud800"], "messages": [{"role": "user", "content": "Hi"}]}')["param"] == "stop"
    empty = refusal(b"")
    assert empty["message"] == 'the request body is empty: send a JSON object with "model" and "messages"'
    latin1 = '{"model": "alice", "messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")
    assert refusal(latin1)["message"] == (f"the body is not UTF-8 text: byte 0xe9 at byte offset {latin1.index(0xE9)} "
                                          "is not valid UTF-8; send the JSON encoded as UTF-8")
    assert refusal(b"[1, 2]")["message"] == "the body must be a JSON object, got an array"
    assert refusal(b"[" * 40_000 + b"]" * 40_000)["message"] == "the body's JSON is nested too deeply to read"


def test_missing_fields_unknown_model_and_broken_json(client, server):
    with pytest.raises(openai.BadRequestError, match="messages: Field required"):
        client.post("/chat/completions", body={"model": "alice"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="model: Field required"):
        client.post("/chat/completions", body={"messages": ask(0)}, cast_to=object)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="carol", messages=ask(0))
    assert e.value.code == "model_not_found" and "alice, bob" in e.value.message
    r = httpx.post(f"{server}/chat/completions", content=b'{"model": "alice", "messages": [', headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_wrong_and_missing_api_keys_are_401(server):
    wrong = openai.OpenAI(base_url=server, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="alice", messages=ask(0))
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.get(f"{server}/models")
    assert r.status_code == 401 and "Missing API key" in r.json()["error"]["message"]
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 401
    lower = httpx.get(f"{server}/models", headers={"Authorization": f"bearer {KEY}"})  # the scheme's case is free
    assert lower.status_code == 200


def test_http_details_say_what_is_wrong(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{server}/chat/completions", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    body = json.dumps({"model": "alice", "messages": ask(0), "max_tokens": 2})
    r = httpx.post(f"{server}/chat/completions", content=body, headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_a_vanishing_temperature_samples_greedily(client, base_name):
    """Dividing logits by 1e-40 overflows (softmax then gives NaN): such a temperature is greedy."""
    greedy = client.chat.completions.create(model=base_name, messages=ask(5), max_tokens=12, temperature=0)
    tiny = client.chat.completions.create(model=base_name, messages=ask(5), max_tokens=12, temperature=1e-40)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_a_client_that_leaves_stops_its_generation(server, base_name):
    """900 tokens take the tiny model well over a second; a client leaving stops its request, which
    then counts as cancelled, not finished, having generated fewer tokens."""
    body = {"model": base_name, "messages": ask(5), "max_tokens": 900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    def cancelled_since(before: dict) -> dict:
        for _ in range(500):
            state = health(server)
            if state["running"] == 0 and state["cancelled"] > before["cancelled"]:
                assert state["cancelled"] == before["cancelled"] + 1 and state["finished"] == before["finished"]
                assert state["tokens"] - before["tokens"] < 900
                return state
            time.sleep(0.02)
        raise AssertionError(f"the generation was not cancelled: {state}")

    state = health(server)
    with httpx.stream("POST", f"{server}/chat/completions", json={**body, "stream": True}, headers=headers) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # the role chunk and the first content, then the client leaves
    state = cancelled_since(state)
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(f"{server}/chat/completions", json=body, headers=headers, timeout=0.1)
    cancelled_since(state)


def test_32_concurrent_streams_equal_the_same_requests_alone(server, base_name):
    """Load: 32 streamed requests at once, three models, greedy and seeded sampling, different
    prompts; every reply complete and equal to the same request's reply alone; no 5xx."""
    models = ["alice", "bob", base_name]
    requests = [dict(model=models[i % 3], messages=ask(i), max_tokens=32, seed=1000 + i,
                     temperature=0 if i % 2 == 0 else 0.8) for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)

    async def one(request: dict) -> tuple[str, str | None, int]:
        text, finish, usage = [], None, None
        async for chunk in await aclient.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return "".join(text), finish, usage.completion_tokens

    async def main() -> tuple[list, dict, float, list]:
        alone = [await one(r) for r in requests]
        before = health(server)
        started = time.perf_counter()
        together = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        return alone, before, time.perf_counter() - started, together

    expected, before, elapsed, got = asyncio.run(main())
    errors = [g for g in got if isinstance(g, BaseException)]
    assert not errors, errors  # any 4xx/5xx or broken stream would be here
    assert all(finish in ("stop", "length") for _, finish, _ in got), "every reply is complete"
    assert got == expected
    assert len({text for text, _, _ in expected}) > 16
    after = health(server)
    assert after["finished"] - before["finished"] == 32 and after["largest_batch"] >= 8
    print(f"32 concurrent streams: {elapsed:.2f}s, largest batch {after['largest_batch']}")


def test_a_seed_out_of_range_is_refused_and_the_server_goes_on(server, client, base_name):
    """A seed of 2**64 overflowed torch's generator in the engine's thread, which died with it: every
    later request, any client's, then waited forever."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for seed in (2**64, -(2**63) - 1):
        body = {"model": "alice", "messages": ask(0), "max_tokens": 2, "temperature": 0.5, "seed": seed}
        r = httpx.post(f"{server}/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "seed" and error["message"].startswith("seed: Input should be")  # pydantic's own, clear
    for seed in (2**63 - 1, -(2**63)):  # the ends of the range still sample
        reply = client.with_options(timeout=30).chat.completions.create(
            model=base_name, messages=ask(1), max_tokens=2, temperature=0.5, seed=seed, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"


def test_public_address_without_key_is_refused(served_runs):
    result = run_cli("serve", str(served_runs[0]), "--host", "0.0.0.0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def test_bad_run_folder_and_bad_options_exit_2(tmp_path, served_runs):
    result = run_cli("serve", str(tmp_path))
    assert result.returncode == 2 and "is not a chatlora run folder" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", str(served_runs[0]), "--max-tokens", "0")
    assert result.returncode == 2 and "--max-tokens must be at least 1" in result.stderr
