"""The contract as one document: OpenAPI 3.1 for every route in qp/routes.py, its
statuses and bodies, written by hand from ../shared/API.md, served at GET /api/openapi.json
and fuzzed by schemathesis."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from qp.openapi import admin, chats, completions, operations
from qp.openapi.parts import ERROR_SCHEMA

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "qp-server",
        "version": "1",
        "description": "The QP chat backend's HTTP API (../shared/API.md). Every error body"
        " is JSON with at least an `error` string. Any route may also answer 400 for a"
        " request the HTTP parser rejects, and 429 when its client is over its rate limit.",
    },
    "paths": chats.PATHS | completions.PATHS | operations.PATHS | admin.PATHS,
    "components": {
        "schemas": {"Error": ERROR_SCHEMA}
        | chats.SCHEMAS
        | completions.SCHEMAS
        | operations.SCHEMAS
        | admin.SCHEMAS,
        "securitySchemes": {
            "adminKey": {"type": "apiKey", "in": "header", "name": "x-admin-key"},
            "metricsToken": {"type": "http", "scheme": "bearer"},
        },
    },
}

_DOCUMENT_JSON = orjson.dumps(DOCUMENT)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT_JSON, content_type="application/json")
