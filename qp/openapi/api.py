"""The API's routes in the OpenAPI document, written by hand from ../shared/API.md, one
literal per route in the order API.md lists them.

Where a check cannot be said in JSON Schema (the system message's required phrases, which
models the server pays for, sizes in bytes) the description says it, and the answer that
check gives is among the documented statuses.
"""

from __future__ import annotations

from typing import Any

from qp.chats.model import CHAT_ID_PATTERN, COST_MAX, INT64_MAX
from qp.openapi.parts import ADMIN, error_answer, json_answer, limited_answer, ref
from qp.policy.policy import MAX_APP_CHARS

# Printable text: no control characters (C0, DEL, C1).
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

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
    "Usage": {
        "type": "object",
        "required": ["promptTokens", "completionTokens", "estimatedCost"],
        "properties": {
            "promptTokens": TOKENS,
            "completionTokens": TOKENS,
            "estimatedCost": COST,
        },
    },
    "Chat": {
        "type": "object",
        "required": [
            "chatId",
            "app",
            "model",
            "messages",
            "totalUsage",
            "createdAt",
            "updatedAt",
        ],
        "properties": {
            "chatId": {"type": "string", "pattern": CHAT_ID},
            "app": {"type": "string"},
            "model": {"type": "string"},
            "messages": {"type": "array"},
            "totalUsage": ref("Usage"),
            "createdAt": {"type": "string", "format": "date-time"},
            "updatedAt": {"type": "string", "format": "date-time"},
        },
    },
    "ChatInput": {
        "type": "object",
        "description": "createdAt, updatedAt and any other field are ignored; messages are"
        " stored exactly as sent. The whole chat may take 10 MiB.",
        "required": ["app", "model", "messages", "totalUsage"],
        "properties": {
            "chatId": {
                "description": "Create: missing, null or empty lets the server make one.",
                "anyOf": [
                    {"type": "string", "pattern": CHAT_ID},
                    {"type": "string", "maxLength": 0},
                    {"type": "null"},
                ],
            },
            "app": APP,
            "model": STORED_TEXT,
            "messages": {"type": "array"},
            "totalUsage": ref("Usage"),
        },
    },
    "ChatBody": {
        "type": "object",
        "required": ["chat"],
        "properties": {"chat": ref("ChatInput")},
    },
    "CompletionRequest": {
        "type": "object",
        "description": "The system message must hold one phrase of each required group, and"
        " a model the server does not pay for needs the client's x-openrouter-key (both"
        " 400 otherwise); a message may hold 100,000 characters (413). The body may take"
        " 500 KiB.",
        "required": ["model", "systemMessage", "messages"],
        "properties": {
            "model": STORED_TEXT,
            "systemMessage": {"type": "string"},
            "messages": {"type": "array", "description": "At most 50 (else 413)."},
            "tools": {"anyOf": [{"type": "array"}, {"type": "null"}]},
            "app": {"anyOf": [APP, {"type": "null"}]},
            "provider": {"description": "A string holds no NUL (400 otherwise)."},
        },
    },
    "UsageTotals": {
        "type": "object",
        "required": ["completions", "promptTokens", "completionTokens", "cost", "clientLeft"],
        "properties": {
            "completions": {"type": "integer"},
            "promptTokens": {"type": "integer"},
            "completionTokens": {"type": "integer"},
            "cost": {"type": "number"},
            "clientLeft": {"type": "integer"},
        },
    },
    "UsageReport": {
        "type": "object",
        "required": ["since", "app", "totals", "overall", "budgets"],
        "properties": {
            "since": {"type": ["string", "null"]},
            "app": {"type": ["string", "null"]},
            "totals": {
                "type": "array",
                "items": {
                    "allOf": [
                        ref("UsageTotals"),
                        {
                            "type": "object",
                            "required": ["app", "model", "payer", "costSource"],
                            "properties": {
                                "app": {"type": ["string", "null"]},
                                "model": {"type": "string"},
                                "payer": {"enum": ["server", "app", "user"]},
                                "costSource": {
                                    "type": "object",
                                    "required": ["stream", "generation", "estimate"],
                                    "additionalProperties": {"type": "integer"},
                                },
                            },
                        },
                    ]
                },
            },
            "overall": ref("UsageTotals"),
            "budgets": {"type": "array", "items": ref("Budget")},
        },
    },
    "Budget": {
        "type": "object",
        "required": ["scope", "period", "cap", "spent", "reserved", "remaining", "resetsAt"],
        "properties": {
            "scope": {"enum": ["server", "app"]},
            "app": {"type": "string"},
            "period": {"enum": ["day", "month"]},
            "cap": {"type": "number"},
            "spent": {"type": "number"},
            "reserved": {"type": "number"},
            "remaining": {"type": "number"},
            "resetsAt": {"type": "string"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "error": {"type": "string"},
            "checks": {
                "type": "object",
                "properties": {
                    "database": {"type": "string"},
                    "storage": {"type": "string"},
                },
            },
        },
    },
}

CHAT_ID_PARAMETER = {
    "name": "chatId",
    "in": "path",
    "required": True,
    "description": f"A chat id ({CHAT_ID}); any other answers 404 (read, delete) or 400.",
    "schema": {"type": "string"},
}
CHAT_BODY = {"required": True, "content": {"application/json": {"schema": ref("ChatBody")}}}
# The chat's revision (a worker's chat not yet updated: its updatedAt), quoted.
ETAG = {
    "ETag": {
        "required": True,
        "description": "The chat's revision",
        "schema": {"type": "string", "pattern": '^"[^"]+"$'},
    }
}


def _condition(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _with_etag(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "headers": ETAG}


PATHS: dict[str, Any] = {
    "/api/chats": {
        "post": {
            "operationId": "createChat",
            "summary": "Store a new chat",
            "requestBody": CHAT_BODY,
            "responses": {
                "200": json_answer(
                    {
                        "type": "object",
                        "required": ["chatId"],
                        "properties": {"chatId": {"type": "string", "pattern": CHAT_ID}},
                    },
                    "Stored",
                ),
                **BODY_ERRORS,
                "409": error_answer("Chat already exists"),
                **COMMON,
                "507": error_answer("Insufficient storage"),
            },
        },
        "get": {
            "operationId": "listChats",
            "summary": "An app's newest 100 chats, whole (admin)",
            "security": ADMIN,
            "parameters": [
                {
                    "name": "app",
                    "in": "query",
                    "required": True,
                    "schema": {**STORED_TEXT, "minLength": 1},
                }
            ],
            "responses": {
                "200": json_answer({"type": "array", "items": ref("Chat")}, "The chats"),
                "400": error_answer("App parameter required, or Invalid app (a NUL)"),
                "401": error_answer("Unauthorized"),
                **COMMON,
            },
        },
    },
    "/api/chats/{chatId}": {
        "parameters": [CHAT_ID_PARAMETER],
        "get": {
            "operationId": "getChat",
            "summary": "One chat",
            "parameters": [
                _condition(
                    "If-None-Match",
                    "Entity tags of copies the client holds: 304 when one names the"
                    " chat's current revision",
                )
            ],
            "responses": {
                "200": _with_etag(json_answer(ref("Chat"), "The chat")),
                "304": {"description": "The client's copy is current: no body", "headers": ETAG},
                "404": error_answer("Chat not found"),
                **COMMON,
            },
        },
        "put": {
            "operationId": "updateChat",
            "summary": "Replace a chat's messages, model and usage",
            "parameters": [
                _condition(
                    "If-Match",
                    "Store only if this names the chat's current revision (its ETag), else"
                    " 412; `*` or none: the last write wins",
                )
            ],
            "requestBody": CHAT_BODY,
            "responses": {
                "200": _with_etag(
                    json_answer(
                        {
                            "type": "object",
                            "required": ["success"],
                            "properties": {"success": {"const": True}},
                        },
                        "Stored; ETag is the new revision",
                    )
                ),
                **BODY_ERRORS,
                "404": error_answer("Chat not found"),
                "412": error_answer(
                    "Chat changed: If-Match names no current revision; nothing stored"
                ),
                **COMMON,
                "507": error_answer("Insufficient storage"),
            },
        },
        "delete": {
            "operationId": "deleteChat",
            "summary": "Remove a chat (admin)",
            "security": ADMIN,
            "responses": {
                "200": json_answer(
                    {"type": "object", "properties": {"success": {"const": True}}},
                    "Gone, whether or not it existed",
                ),
                "401": error_answer("Unauthorized"),
                "404": error_answer("Chat not found (not a chat id)"),
                **COMMON,
            },
        },
    },
    "/api/completion": {
        "post": {
            "operationId": "createCompletion",
            "summary": "A streamed LLM completion, relayed from OpenRouter",
            "parameters": [
                {
                    "name": "x-openrouter-key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("CompletionRequest")}},
            },
            "responses": {
                "200": {
                    "description": "OpenRouter's server-sent events, byte for byte",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **BODY_ERRORS,
                "402": error_answer(
                    "Budget exhausted: a budget of the server's keys is used up (Retry-After:"
                    " seconds to its reset), or upstream's own 402"
                ),
                **COMMON,
                "502": error_answer("Bad Gateway: upstream unreachable or answering oddly"),
                "504": error_answer("Gateway Timeout"),
                "default": error_answer(
                    "Upstream's own status and reason (e.g. 401), with its message; 500 when"
                    " no key is configured"
                ),
            },
        },
    },
    "/api/usage": {
        "get": {
            "operationId": "usageReport",
            "summary": "Completions, tokens and cost by app, model and payer (admin)",
            "security": ADMIN,
            "parameters": [
                {"name": "app", "in": "query", "required": False, "schema": STORED_TEXT},
                {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "description": "An ISO 8601 date or date-time; anything else is 400.",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": json_answer(ref("UsageReport"), "The totals"),
                "400": error_answer("Invalid since parameter, or Invalid app (a NUL)"),
                "401": error_answer("Unauthorized"),
                **COMMON,
            },
        },
    },
    "/api/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": json_answer({"type": "object"}, "OpenAPI 3.1")},
        },
    },
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Whether the database and the blob store answer and take writes",
            "responses": {
                "200": json_answer(ref("Health"), "Healthy"),
                "503": json_answer(ref("Health"), "Not: checks name what and why"),
            },
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (QP_METRICS_TOKEN, or loopback only)",
            "security": [{"metricsToken": []}, {}],
            "responses": {
                "200": {
                    "description": "Prometheus text",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": error_answer("Unauthorized"),
                "403": error_answer("Forbidden"),
            },
        },
    },
}
