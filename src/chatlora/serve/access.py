"""The request log: one line per request once its response is complete (a stream: after its last
chunk), as uvicorn's and vLLM's users expect, with what the engine did for it:

    2026-11-27 10:15:02 127.0.0.1:51234 "POST /v1/chat/completions" 200 model=alice tokens=35+8 finish=length 0.41s

The handler fills in the details through `note(scope)`. Never logged: headers (the API key), the
query string (a key pasted into a URL), and model names the server does not have (any text a client
sends); the API key is also masked wherever it would still appear, in a path for one.
"""

from __future__ import annotations

import logging
import sys
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("chatlora.serve.requests")
SCOPE_KEY = "chatlora.request"


def setup_logging() -> None:
    """The server's messages (this log, the drain, the engine's errors) to stderr, with the time."""
    root = logging.getLogger("chatlora.serve")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def note(scope: Scope) -> dict:
    """The dict the log line's details go in: model, prompt_tokens, completion_tokens, finish, refused
    (the param or code of a 4xx)."""
    return scope.setdefault(SCOPE_KEY, {})


def printable(text: str, limit: int = 200) -> str:
    """A client's path as one safe line: control characters escaped, cut at `limit`."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[:limit] + "..."


class RequestLog:
    def __init__(self, app: ASGIApp, secret: str | None = None):
        self.app, self.secret = app, secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [0]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(self.line(scope, status[0], time.perf_counter() - started))

    def line(self, scope: Scope, status: int, seconds: float) -> str:
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        parts = [who, f'"{scope["method"]} {printable(scope["path"])}"', str(status or "-")]
        details = scope.get(SCOPE_KEY, {})
        if "model" in details:
            parts.append(f"model={details['model']}")
        if "prompt_tokens" in details:
            parts.append(f"tokens={details['prompt_tokens']}+{details.get('completion_tokens', 0)}")
        if "finish" in details:
            parts.append(f"finish={details['finish']}")
        if "refused" in details:
            parts.append(f"refused={details['refused']}")
        parts.append(f"{seconds:.2f}s")
        text = " ".join(parts)
        return text.replace(self.secret, "***") if self.secret else text
