"""The admin routes of the operator's page in the OpenAPI document (qp/ops/openapi.py adds
these paths and schemas to its own), so schemathesis fuzzes them like the rest."""

from __future__ import annotations

from typing import Any

from qp.admin.handlers import MAX_DAYS, OUTCOME_NAMES

ADMIN: list[dict[str, list[str]]] = [{"adminKey": []}]
COUNT = {"type": "integer", "minimum": 0}
MONEY = {"type": "number"}
TIME = {"type": "string"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties, **more}


ERROR = {"$ref": "#/components/schemas/Error"}
UNAUTHORIZED = _json(ERROR, "Unauthorized")
WRONG_KEYS = _json(ERROR, "Too many wrong admin keys from this client: blocked for an hour")
HOURLY_OUTCOMES = _object({"hour": TIME, **dict.fromkeys(OUTCOME_NAMES, COUNT)})
COST_OF_SOURCE = _object({"completions": COUNT, "cost": MONEY})

SCHEMAS: dict[str, Any] = {
    "AdminSpend": _object(
        {
            "days": COUNT,
            "by": {"enum": ["app", "model"]},
            "payer": {"enum": ["operator", "all"]},
            "from": TIME,
            "to": TIME,
            "names": {"type": "array", "items": {"type": "string"}},
            "series": {
                "type": "array",
                "items": _object(
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
            "costSource": _object(
                dict.fromkeys(("stream", "generation", "estimate"), COST_OF_SOURCE)
            ),
            "hourly": {"type": "array", "items": HOURLY_OUTCOMES},
            "budgets": {"type": "array", "items": {"$ref": "#/components/schemas/Budget"}},
        }
    ),
    "AdminApps": _object(
        {
            "apps": {
                "type": "array",
                "items": _object({"app": {"type": "string"}, "chats": COUNT, "updatedAt": TIME}),
            }
        }
    ),
    "AdminBlocks": _object(
        {
            "blocks": {
                "type": "array",
                "items": _object({"client": {"type": "string"}, "since": TIME, "until": TIME}),
            },
            "next": {"type": ["string", "null"]},
            "refusals": {"type": "array", "items": _object({"hour": TIME, "refusals": COUNT})},
        }
    ),
    "AdminOverview": _object(
        {
            "status": {"enum": ["ok", "unavailable"]},
            "checks": _object({"database": {"type": "string"}, "storage": {"type": "string"}}),
            "version": {"type": "string"},
            "startedAt": TIME,
            "uptimeSeconds": COUNT,
            "openStreams": COUNT,
            "database": {"enum": ["sqlite", "postgresql"]},
            "storage": {"enum": ["file", "s3"]},
            "settings": {"type": "string"},
        }
    ),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _get(operation: str, summary: str, schema: str, **responses: Any) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "security": ADMIN,
            "responses": {
                "200": _json({"$ref": f"#/components/schemas/{schema}"}, summary),
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
        **{"400": _json(ERROR, "Invalid days, by or payer parameter")},
    ),
    "/api/admin/apps": _get("adminApps", "Every app with its chat count (admin)", "AdminApps"),
    "/api/admin/blocks": _get(
        "adminBlocks",
        "A page of the blocks in force, refusals per hour (admin)",
        "AdminBlocks",
        **{"400": _json(ERROR, "Invalid after parameter")},
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
                "200": _json(
                    _object({"success": {"const": True}}), "Lifted: the client is served again"
                ),
                "401": UNAUTHORIZED,
                "404": _json(ERROR, "Block not found"),
                "429": WRONG_KEYS,
            },
        }
    },
}
PATHS["/api/admin/spend"]["get"]["parameters"] = [
    _query(
        "days",
        {"type": "string"},
        f"Days to show, today included: 1 to {MAX_DAYS} (default 30); anything else is 400.",
    ),
    _query("by", {"type": "string"}, "`app` (default) or `model`; anything else is 400."),
    _query(
        "payer",
        {"type": "string"},
        "`operator` (the server's and apps' keys, default) or `all`; anything else is 400.",
    ),
]
PATHS["/api/admin/blocks"]["get"]["parameters"] = [
    _query(
        "after",
        {"type": "string"},
        "The `next` of the page before (a client hash, 64 lowercase hex digits); none: the"
        " first page. Anything else is 400.",
    ),
]
