"""The chat routes in the OpenAPI document: /api/chats and /api/chats/{chatId}."""

from __future__ import annotations

from typing import Any

from qp.openapi.parts import (
    ADMIN,
    APP,
    BODY_ERRORS,
    CHAT_ID,
    COMMON,
    COST,
    STORED_TEXT,
    TOKENS,
    error_answer,
    json_answer,
    ref,
)

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


SCHEMAS: dict[str, Any] = {
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
}

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
}
