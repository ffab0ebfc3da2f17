"""The OpenAI chat-completions request, checked, and the response bodies built from engine Events.

Strict types (pydantic strict mode): OpenAI refuses `"max_tokens": "10"`, so do we. Fields OpenAI
has and we do not implement are refused when set to anything but their neutral value, rather than
silently ignored; unknown fields are ignored, as OpenAI-compatible servers do for client extras.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from chatlora.serve.params import SEED_MAX, SEED_MIN, Event, RequestError, SamplingParams, Usage

Number = float  # in strict mode a float field takes ints but not strings or booleans

# OpenAI's request fields this server does not implement, and the values that ask for nothing.
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens."""
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool = False
    """Not OpenAI's: generate max_tokens tokens whatever the model says (vLLM has it; for benchmarks)."""
    # OpenAI's options this server does not implement: accepted only at their neutral value (a client
    # that asks for JSON mode or tool calls must not get free text back as if it had them).
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = UNSUPPORTED[info.field_name]
        if value is not None and value not in neutral:
            raise ValueError(f"{info.field_name}={value!r} is not supported by this server (only {neutral[0]!r})")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streamed(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")  # as OpenAI answers
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "user":
            raise ValueError("the last message must be the user's (the reply continues the conversation)")
        return v

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos)

    def conversation(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


def param_of(loc: tuple) -> str:
    """`messages.0.content` from pydantic's location, without "body" and the union member tags it adds
    (`content.str`, `stop.list[str]`)."""
    fields = ChatRequest.model_fields.keys() | Message.model_fields.keys() | TextPart.model_fields.keys() | {"include_usage"}
    return ".".join(str(p) for p in loc if isinstance(p, int) or p in fields)


def error_body(e: RequestError) -> dict[str, Any]:
    return {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def completion_body(cid: str, model: str, text: str, last: Event) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": last.finish_reason}],
        "usage": usage_body(last.usage) if last.usage else None,
    }


def chunk_body(cid: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None = None,
               usage: Usage | None = None, choices: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else []}
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body


def models_body(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "chatlora"} for n in names]}
