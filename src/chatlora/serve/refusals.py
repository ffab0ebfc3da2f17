"""A request FastAPI could not read or pydantic refused, as one RequestError that says what is wrong
in the client's terms (JSON types, the field's dotted name as `param`), instead of pydantic's and
FastAPI's wording ("Input should be a valid dictionary or object to extract fields from", "There was
an error parsing the body")."""

from __future__ import annotations

from chatlora.generate.events import RequestError
from chatlora.serve.schema import json_type, param_of

# pydantic's error types whose message names the expected JSON type; "got ..." is added to them.
EXPECTED = {
    "model_type": "a JSON object", "dict_type": "a JSON object", "model_attributes_type": "a JSON object",
    "list_type": "a list", "string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
    "float_type": "a number",
}


def invalid(errors: list[dict], content_type: str) -> RequestError:
    """The first of pydantic's errors (FastAPI's RequestValidationError.errors()) as a RequestError."""
    first = errors[0]
    loc = tuple(first["loc"])
    if first["type"] == "json_invalid":
        return RequestError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if loc == ("body",) and first["type"] == "missing":
        return RequestError("the request body is empty: send a JSON object with \"model\" and \"messages\"")
    where = param_of(loc)
    if not where and content_type != "application/json":  # the body was not read as JSON at all
        return RequestError(f"send the body as JSON with 'Content-Type: application/json' (it came as {content_type or 'no Content-Type'})")
    if first["type"] in EXPECTED:
        message = f"must be {EXPECTED[first['type']]}, got {json_type(first.get('input'))}"
        if not where:
            return RequestError(f"the body {message}")
    else:
        message = first["msg"].removeprefix("Value error, ")
    return RequestError(f"{where}: {message}" if where else message, param=where or None)


def unreadable(cause: BaseException | None) -> RequestError | None:
    """Why FastAPI could not parse a body ("There was an error parsing the body"), when we can tell."""
    if isinstance(cause, UnicodeDecodeError):
        return RequestError(f"the body is not UTF-8 text: byte 0x{cause.object[cause.start]:02x} at byte offset "
                            f"{cause.start} is not valid UTF-8; send the JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return RequestError("the body's JSON is nested too deeply to read")
    return None
