"""What one generation request asks for, what it gets back, and the errors a request can earn.

Shared by the engine, the HTTP server and the web page, so all three mean the same by each option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatlora.errors import ChatloraError
from chatlora.model.generate import SEED_MAX, SEED_MIN, is_greedy


class RequestError(ChatloraError):
    """A request the server refuses; becomes an OpenAI-shaped error body with `status`."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """New tokens at most, the stop token included; None: as many as the server and the context allow."""
    temperature: float = 1.0
    """0 means greedy (argmax); OpenAI's default is 1."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seeds this request's own random generator, so a seeded reply is the same batched or alone."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply; the reply is cut before the first one found."""
    ignore_eos: bool = False
    """Keep going past the model's stop tokens (fixed-length replies for benchmarks; as in vLLM)."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        if not 0 <= self.temperature <= 2:
            raise RequestError("temperature must be between 0 and 2", param="temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be greater than 0 and at most 1", param="top_p")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise RequestError(f"seed must be between {SEED_MIN} and {SEED_MAX} (a 64-bit integer)", param="seed")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", param="stop")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)  # 0, or so small that dividing logits by it overflows


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
    """None while the reply goes on; then "stop" (a stop token or string), "length" (max_tokens) or
    "error"."""
    usage: Usage | None = None
    error: str | None = None
    tokens: list[int] = field(default_factory=list)
    """Token ids generated in this step (used by tests and benchmarks, not sent to clients)."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
