"""The pieces every part of the OpenAPI document is written with."""

from __future__ import annotations

from typing import Any

from qp.chats.model import CHAT_ID_PATTERN, COST_MAX, INT64_MAX
from qp.policy.policy import MAX_APP_CHARS

# The admin routes' security requirement: the x-admin-key header.
ADMIN: list[dict[str, list[str]]] = [{"adminKey": []}]


def ref(name: str) -> dict[str, str]:
    """A reference to one of the document's schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


ERROR = ref("Error")
# Every error body: at least an `error` string.
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}


def json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_answer(description: str) -> dict[str, Any]:
    return json_answer(ERROR, description)


def limited_answer(description: str) -> dict[str, Any]:
    """An error answer with the Retry-After header."""
    answer = error_answer(description)
    answer["headers"] = {"Retry-After": {"required": True, "schema": {"type": "string"}}}
    return answer


def object_of(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An object whose every property is required."""
    return {"type": "object", "required": list(properties), "properties": properties, **more}


def query_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


APP_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
CHAT_ID = f"^{CHAT_ID_PATTERN.pattern}$"


COMMON = {
    "429": limited_answer("Rate limit exceeded (or, for writes, the client's daily storage quota)"),
    "503": error_answer("The database or the blob store failed: Storage unavailable"),
}
BODY_ERRORS = {
    "400": error_answer("Invalid JSON body, invalid data, invalid chat id or app"),
    "408": error_answer("The request body came too slowly"),
    "413": error_answer("Request validation failed: the body or the chat is too large"),
}

TOKENS = {"type": "number", "minimum": -INT64_MAX - 1, "maximum": INT64_MAX}
COST = {"type": "number", "minimum": -COST_MAX - 1, "maximum": COST_MAX}
APP = {"type": "string", "maxLength": MAX_APP_CHARS, "pattern": APP_PATTERN}
# Text the server stores: no NUL (nor, in JSON, a lone surrogate, which no UTF-8 body holds).
STORED_TEXT = {"type": "string", "pattern": "^[^\\u0000]*$"}
