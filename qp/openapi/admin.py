"""The admin routes of the operator's page in the OpenAPI document, so schemathesis fuzzes
them like the rest."""

from __future__ import annotations

from typing import Any

from qp.admin.handlers import MAX_DAYS, OUTCOME_NAMES
from qp.openapi.parts import ADMIN, ERROR, json_answer, object_of, query_parameter, ref

COUNT = {"type": "integer", "minimum": 0}
MONEY = {"type": "number"}
TIME = {"type": "string"}
OPTIONAL_STRINGS = {"type": ["array", "null"], "items": {"type": "string"}}
OPTIONAL_COUNT = {"type": ["integer", "null"], "minimum": 1}


UNAUTHORIZED = json_answer(ERROR, "Unauthorized")
WRONG_KEYS = json_answer(ERROR, "Too many wrong admin keys from this client: blocked for an hour")
HOURLY_OUTCOMES = object_of({"hour": TIME, **dict.fromkeys(OUTCOME_NAMES, COUNT)})
COST_OF_SOURCE = object_of({"completions": COUNT, "cost": MONEY})

SCHEMAS: dict[str, Any] = {
    "AdminSpend": object_of(
        {
            "days": COUNT,
            "by": {"enum": ["app", "model"]},
            "payer": {"enum": ["operator", "all"]},
            "from": TIME,
            "to": TIME,
            "names": {"type": "array", "items": {"type": "string"}},
            "series": {
                "type": "array",
                "items": object_of(
                    {
                        "day": TIME,
                        "costs": {"type": "object", "additionalProperties": MONEY},
                        "total": MONEY,
                    }
                ),
            },
            "total": MONEY,
            "today": MONEY,
            "month": MONEY,
            "costSource": object_of(
                dict.fromkeys(("stream", "generation", "estimate"), COST_OF_SOURCE)
            ),
            "hourly": {"type": "array", "items": HOURLY_OUTCOMES},
            "budgets": {"type": "array", "items": ref("Budget")},
            "cache": object_of(
                {
                    "hits": COUNT,
                    "saved": MONEY,
                    "apps": {
                        "type": "array",
                        "items": object_of(
                            {
                                "app": {"type": "string"},
                                "hits": COUNT,
                                "completions": COUNT,
                                "hitRate": MONEY,
                                "saved": MONEY,
                            }
                        ),
                    },
                }
            ),
        }
    ),
    "AdminPolicies": object_of(
        {
            "requireListed": {"type": "boolean"},
            "apps": {
                "type": "array",
                "items": object_of(
                    {
                        "app": {"type": "string"},
                        "models": OPTIONAL_STRINGS,
                        "maxCompletionTokens": OPTIONAL_COUNT,
                        "maxMessages": OPTIONAL_COUNT,
                        "maxRequestChars": OPTIONAL_COUNT,
                        "systemPromptPrefixes": OPTIONAL_STRINGS,
                        "spentToday": MONEY,
                        "dailyBudget": MONEY,
                    }
                ),
            },
            "refusals": {
                "type": "array",
                "items": object_of(
                    {
                        "app": {"type": "string"},
                        "reason": {"enum": ["unknown_app", "model", "cap", "prefix"]},
                        "refusals": COUNT,
                    }
                ),
            },
        }
    ),
    "AdminApps": object_of(
        {
            "apps": {
                "type": "array",
                "items": object_of({"app": {"type": "string"}, "chats": COUNT, "updatedAt": TIME}),
            }
        }
    ),
    "AdminBlocks": object_of(
        {
            "blocks": {
                "type": "array",
                "items": object_of({"client": {"type": "string"}, "since": TIME, "until": TIME}),
            },
            "next": {"type": ["string", "null"]},
            "refusals": {"type": "array", "items": object_of({"hour": TIME, "refusals": COUNT})},
        }
    ),
    "AdminOverview": object_of(
        {
            "status": {"enum": ["ok", "unavailable"]},
            "checks": object_of({"database": {"type": "string"}, "storage": {"type": "string"}}),
            "version": {"type": "string"},
            "startedAt": TIME,
            "uptimeSeconds": COUNT,
            "openStreams": COUNT,
            "openBreakers": {"type": "object", "additionalProperties": COUNT},
            "database": {"enum": ["sqlite", "postgresql"]},
            "storage": {"enum": ["file", "s3"]},
            "settings": {"type": "string"},
        }
    ),
}


def _get(operation: str, summary: str, schema: str, **responses: Any) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "security": ADMIN,
            "responses": {
                "200": json_answer(ref(schema), summary),
                "401": UNAUTHORIZED,
                "429": WRONG_KEYS,
                **responses,
            },
        }
    }


PATHS: dict[str, Any] = {
    "/api/admin/overview": _get(
        "adminOverview", "Health, version, uptime, storage and settings (admin)", "AdminOverview"
    ),
    "/api/admin/spend": _get(
        "adminSpend",
        "Cost per UTC day by app or model, by source, per hour by outcome (admin)",
        "AdminSpend",
        **{"400": json_answer(ERROR, "Invalid days, by or payer parameter")},
    ),
    "/api/admin/apps": _get("adminApps", "Every app with its chat count (admin)", "AdminApps"),
    "/api/admin/policies": _get(
        "adminPolicies",
        "Each app's policy in force, its spend today, the refusals by reason (admin)",
        "AdminPolicies",
    ),
    "/api/admin/blocks": _get(
        "adminBlocks",
        "A page of the blocks in force, refusals per hour (admin)",
        "AdminBlocks",
        **{"400": json_answer(ERROR, "Invalid after parameter")},
    ),
    "/api/admin/blocks/{client}": {
        "delete": {
            "operationId": "adminLiftBlock",
            "summary": "Lift a client's block (admin)",
            "security": ADMIN,
            "parameters": [
                {
                    "name": "client",
                    "in": "path",
                    "required": True,
                    "description": "The client's salted address hash, 64 lowercase hex digits.",
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": json_answer(
                    object_of({"success": {"const": True}}), "Lifted: the client is served again"
                ),
                "401": UNAUTHORIZED,
                "404": json_answer(ERROR, "Block not found"),
                "429": WRONG_KEYS,
            },
        }
    },
}
PATHS["/api/admin/spend"]["get"]["parameters"] = [
    query_parameter(
        "days",
        {"type": "string"},
        f"Days to show, today included: 1 to {MAX_DAYS} (default 30); anything else is 400.",
    ),
    query_parameter("by", {"type": "string"}, "`app` (default) or `model`; anything else is 400."),
    query_parameter(
        "payer",
        {"type": "string"},
        "`operator` (the server's and apps' keys, default) or `all`; anything else is 400.",
    ),
]
PATHS["/api/admin/blocks"]["get"]["parameters"] = [
    query_parameter(
        "after",
        {"type": "string"},
        "The `next` of the page before (a client hash, 64 lowercase hex digits); none: the"
        " first page. Anything else is 400.",
    ),
]
