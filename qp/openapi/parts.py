"""The pieces every part of the OpenAPI document is written with."""

from __future__ import annotations

from typing import Any

# The admin routes' security requirement: the x-admin-key header.
ADMIN: list[dict[str, list[str]]] = [{"adminKey": []}]


def ref(name: str) -> dict[str, str]:
    """A reference to one of the document's schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


ERROR = ref("Error")


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
