"""What the engine hands back for a request (`Event`s with their `Usage`) and how it refuses one
(`RequestError`). Shared by the engine, the HTTP server and the web page, so all three mean the
same by each; the HTTP layer turns a RequestError into an OpenAI-shaped error body."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatlora.errors import ChatloraError


class RequestError(ChatloraError):
    """A request the engine or the server refuses; becomes an OpenAI-shaped error body with `status`."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    """Tokens the model generated, the stop token included (it was generated and paid for)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Event:
    """One step of a reply as the engine hands it out: new text, and at the end the finish reason."""

    text: str = ""
    finish_reason: str | None = None
    """None while the reply goes on; then "stop" (a stop token or string), "length" (max_new_tokens)
    or "error"."""
    usage: Usage | None = None
    error: str | None = None
    tokens: list[int] = field(default_factory=list)
    """Token ids generated in this step (used by tests and benchmarks, not sent to clients)."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
