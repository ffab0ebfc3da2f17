"""The OpenAI-compatible HTTP API over an Engine: /v1/models and /v1/chat/completions (streamed as
server-sent events or whole), plus /health. Every refusal is OpenAI-shaped JSON with a 4xx status
(503 while the server drains to stop: serve/drain.py)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatlora import __version__
from chatlora.serve.access import RequestLog, note
from chatlora.serve.drain import Gate
from chatlora.generate.engine import Engine, Ticket
from chatlora.generate.events import Event, RequestError
from chatlora.serve.refusals import invalid, unreadable
from chatlora.serve.schema import ChatRequest, chunk_body, completion_body, error_body, models_body, new_id


def error_response(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Connection": "close"} if e.status == 503 else None
    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


class Guard:
    """ASGI middleware in front of everything: the API key, the drain, then the body size limit.

    Before routing, so an unknown path without the key is a 401 like any other, and a huge body is
    refused before anyone parses it. The body is read here (at most max_body bytes) and replayed.
    Requests let in are counted in the gate until their response is written.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int, gate: Gate):
        self.app, self.api_key, self.max_body, self.gate = app, api_key, max_body, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:
            given = headers.get("authorization", "")
            scheme, _, key = given.partition(" ")  # the scheme's case does not matter (RFC 7235)
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                why = "Incorrect API key provided" if given else "Missing API key: send it as 'Authorization: Bearer KEY'"
                return await error_response(RequestError(why, 401, "invalid_api_key"))(scope, receive, send)
        if self.gate.draining:
            stopping = RequestError("the server is shutting down; send the request to another server, or again once "
                                    "this one is back", 503, "server_shutting_down", kind="server_error")
            return await error_response(stopping)(scope, receive, send)
        self.gate.active += 1
        try:
            await self._read_and_pass(scope, receive, send, headers)
        finally:
            self.gate.active -= 1

    async def _read_and_pass(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        too_big = RequestError(f"the request body is larger than this server's limit of {self.max_body} bytes",
                               413, "request_too_large")
        if int(headers.get("content-length") or 0) > self.max_body:
            return await error_response(too_big)(scope, receive, send)
        body, more = b"", True
        while more:  # a chunked body has no content-length: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await error_response(too_big)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, api_key: str | None = None, max_body: int = 1 << 20, gate: Gate | None = None) -> ASGIApp:
    """The ASGI app. `api_key` None serves without authentication (loopback only: see server.check_bind);
    `gate` is shared with the server that drains it (serve/drain.py)."""
    gate = gate or Gate()
    app = FastAPI(title="chatlora", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    render = ThreadPoolExecutor(1, thread_name_prefix="chatlora-render")

    def refuse(request: Request, e: RequestError) -> JSONResponse:
        if e.param or e.code:  # our names, never the client's text: safe for the request log
            note(request.scope)["refused"] = e.code or e.param
        return error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return refuse(request, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return refuse(request, invalid(list(e.errors()), kind))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        why = unreadable(e.__cause__) if e.status_code == 400 else None
        response = error_response(why or RequestError(str(e.detail), e.status_code, kind="invalid_request_error"))
        response.headers.update(e.headers or {})  # 405's Allow, for one
        return response

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:  # a bug, never bad input
        return JSONResponse({"error": {"message": f"internal error: {e}", "type": "server_error", "param": None,
                                       "code": None}}, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": engine.names, **asdict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return models_body(engine.names, started)

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name not in engine.names:
            raise RequestError(f"The model '{name}' does not exist", 404, "model_not_found", "model")
        return models_body([name], started)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        details = note(request.scope)  # for the request log
        if body.model in engine.names:
            details["model"] = body.model
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        # Rendering and tokenizing a long prompt takes a while: off the event loop, so other streams and
        # /health go on meanwhile; in one thread, as the tokenizer is shared.
        ticket = await loop.run_in_executor(render, engine.submit, body.model, body.conversation(), body.sampling(), emit)
        details["prompt_tokens"] = len(ticket.prompt)
        cid = new_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(ticket, events, request, cid, body.model, include_usage, details),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            text = []
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client left: stop generating for nobody
                    getter.cancel()
                    ticket.cancel()
                    details["finish"] = "cancelled"
                    return JSONResponse({}, status_code=499)
                event = getter.result()
                record(details, event)
                if event.error:  # the engine stopping (503) or a failed generation (500)
                    raise RequestError(event.error, 503 if engine.stopped else 500, kind="server_error")
                text.append(event.text)
                if event.done:
                    return completion_body(cid, body.model, "".join(text), event)
        finally:
            watcher.cancel()
            ticket.cancel()

    return RequestLog(Guard(app, api_key, max_body, gate), api_key)


def record(details: dict, event: Event) -> None:
    """The request log's tokens and finish reason, from a request's last Event."""
    if event.done:
        details["finish"] = event.finish_reason
        if event.usage:
            details["completion_tokens"] = event.usage.completion_tokens


async def sse(ticket: Ticket, events: asyncio.Queue[Event], request: Request, cid: str, model: str,
              include_usage: bool, details: dict) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk, [usage chunk,] [DONE].
    A reply that fails (or is cut off by the server stopping) ends with an error chunk, then [DONE]."""
    created = int(time.time())

    def data(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    # Generation is cancelled when the client leaves, even while no chunk is being written.
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    watcher.add_done_callback(lambda _: ticket.cancel())
    try:
        yield data(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            record(details, event)
            if event.error:
                yield data({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
            if event.text:
                yield data(chunk_body(cid, model, created, {"content": event.text}))
            if event.done:
                yield data(chunk_body(cid, model, created, {}, event.finish_reason))
                if include_usage:
                    yield data(chunk_body(cid, model, created, {}, usage=event.usage, choices=False))
                yield "data: [DONE]\n\n"
                return
    finally:
        details.setdefault("finish", "cancelled")  # the client left before the end
        watcher.cancel()
        ticket.cancel()
