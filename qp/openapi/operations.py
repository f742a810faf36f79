"""The routes for operators and monitoring in the OpenAPI document: the document itself,
/healthz and /metrics."""

from __future__ import annotations

from typing import Any

from qp.openapi.parts import (
    error_answer,
    json_answer,
    ref,
)

SCHEMAS: dict[str, Any] = {
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

PATHS: dict[str, Any] = {
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
