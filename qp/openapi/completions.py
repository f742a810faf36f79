"""The completion and usage routes in the OpenAPI document.

Where a check cannot be said in JSON Schema (the system message's required phrases, which
models the server pays for, sizes in bytes) the description says it, and the answer that
check gives is among the documented statuses.
"""

from __future__ import annotations

from typing import Any

from qp.openapi.parts import (
    ADMIN,
    APP,
    BODY_ERRORS,
    COMMON,
    STORED_TEXT,
    error_answer,
    json_answer,
    ref,
)

SCHEMAS: dict[str, Any] = {
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
}

PATHS: dict[str, Any] = {
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
                    "description": "OpenRouter's server-sent events, byte for byte; or, where"
                    " the policy turns the response cache on, an identical request's completed"
                    " answer replayed (or followed while in flight)",
                    "headers": {
                        "X-QP-Cache": {
                            "description": "hit: answered from the response cache; miss: otherwise",
                            "schema": {"type": "string", "enum": ["hit", "miss"]},
                        }
                    },
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **BODY_ERRORS,
                "402": error_answer(
                    "Budget exhausted: a budget of the server's keys is used up (Retry-After:"
                    " seconds to its reset), or upstream's own 402"
                ),
                **COMMON,
                "502": error_answer(
                    "Bad Gateway: upstream unreachable or answering oddly (after the retries"
                    " and fallback models)"
                ),
                "503": error_answer(
                    "Storage unavailable (the database failed); Service Unavailable:"
                    " upstream's own 503 after the retries, or every model to try skipped while"
                    " its breaker is open (Retry-After: seconds until it is tried again)"
                ),
                "504": error_answer(
                    "Gateway Timeout: no first byte within the upstream timeout, retries included"
                ),
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
}
