"""The OpenAI chat-completions request, checked, and the response bodies built from engine Events.

Strict types (pydantic strict mode): OpenAI refuses `"max_tokens": "10"`, so do we. Fields OpenAI
has and we do not implement are refused when set to anything but their neutral value, rather than
silently ignored; unknown fields are ignored, as OpenAI-compatible servers do for client extras.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from chatlora.data.formats import not_text
from chatlora.generate.events import Event, RequestError, Usage
from chatlora.generate.sampling import SEED_MAX, SEED_MIN, Sampling
from chatlora.serve.params import request_sampling

Number = float  # in strict mode a float field takes ints but not strings or booleans

# OpenAI's request fields this server does not implement, and the values that ask for nothing.
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
}


# Content parts of other types, as OpenAI names them, and what to call them in the refusal.
NOT_TEXT = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": "refusal parts"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed JSON value's type, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def text(value: str) -> str:
    """`value`, or ValueError when it is not Unicode text (an unpaired surrogate escape such as "\\ud800",
    which no tokenizer takes and no JSON encoder writes back)."""
    why = not_text(value)
    if why:
        raise ValueError(why)
    return value


def text_or_parts(value: Any) -> Any:
    """Message content: a string, or a list of text parts; anything else refused with why."""
    if isinstance(value, str):
        return text(value)
    if not isinstance(value, list):
        raise ValueError(f'must be a string or a list of text parts ({{"type": "text", "text": "..."}}), got {json_type(value)}')
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = NOT_TEXT.get(kind, f"parts of type {json.dumps(kind)}") if isinstance(kind, str) else None
            raise ValueError(f"part {i}: {what} are not supported by this server, only text parts" if what else
                             f'part {i} must be {{"type": "text", "text": "..."}}')
        if not isinstance(part.get("text"), str):
            raise ValueError(f'part {i} needs "text": a string')
        try:
            text(part["text"])
        except ValueError as e:
            raise ValueError(f"part {i}: {e}") from None
    return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        return text_or_parts(v)

    def as_dict(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        joined = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": joined}


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
    temperature: Number | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Number | None = Field(None, gt=0, le=1, allow_inf_nan=False)
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
            allowed = " or ".join(json.dumps(n) for n in neutral)
            raise ValueError(f"this server supports only {allowed}, not {json.dumps(value)}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streamed(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")  # as OpenAI answers
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        others = [x for x in stops if not isinstance(x, str)] if isinstance(stops, list) else []
        got = (json_type(v) if not isinstance(stops, list) else f"{len(stops)} items" if len(stops) > 4
               else f"a list holding {json_type(others[0])}" if others else "an empty string" if not all(stops) else None)
        if got:
            raise ValueError(f"must be a string or a list of up to 4 non-empty strings, got {got}")
        for s in stops:
            text(s)
        return stops

    @field_validator("model")
    @classmethod
    def _model_text(cls, v: str) -> str:
        return text(v)

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "user":
            raise ValueError("the last message must be the user's (the reply continues the conversation)")
        return v

    def sampling(self) -> Sampling:
        """The engine's options for this request (RequestError for a value out of range)."""
        return request_sampling(
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
    # A message may quote the client (a model name): escape what UTF-8 cannot carry, or writing the
    # body would fail.
    message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": e.kind, "param": e.param, "code": e.code}}


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
