"""Handlers for /api/chats: parse and validate, call the ChatStore, shape the answer."""

from __future__ import annotations

from aiohttp import web

from qp.appkeys import CHAT_STORE, CONFIG, POLICY
from qp.auth import require_admin
from qp.bodies import read_json
from qp.chat_model import (
    ChatExists,
    ChatLimitExceeded,
    ChatNotFound,
    is_valid_chat_id,
    parse_chat,
)
from qp.errors import ApiError, json_bytes_response, json_response

CHAT_NOT_FOUND = "Chat not found"
SUCCESS = {"success": True}


async def create_chat(request: web.Request) -> web.Response:
    policy = request.app[POLICY].current
    body = await read_json(request, policy.max_chat_body_bytes)
    chat = parse_chat(body, id_required=False, max_bytes=policy.max_chat_body_bytes)
    if chat.chat_id is not None and not is_valid_chat_id(chat.chat_id):
        raise ApiError(400, "Invalid chat id")
    try:
        chat_id = await request.app[CHAT_STORE].create(chat, policy.max_chats_per_app)
    except ChatLimitExceeded:
        limit = policy.max_chats_per_app
        raise ApiError(
            400, f"Chat limit exceeded for app {chat.app}. Maximum {limit} chats allowed."
        ) from None
    except ChatExists:
        raise ApiError(409, "Chat already exists") from None
    return json_response({"chatId": chat_id})


async def get_chat(request: web.Request) -> web.Response:
    chat_id = request.match_info["chat_id"]
    chat = await request.app[CHAT_STORE].get_json(chat_id) if is_valid_chat_id(chat_id) else None
    if chat is None:
        raise ApiError(404, CHAT_NOT_FOUND)
    return json_bytes_response(chat)


async def update_chat(request: web.Request) -> web.Response:
    chat_id = request.match_info["chat_id"]
    policy = request.app[POLICY].current
    body = await read_json(request, policy.max_chat_body_bytes)
    chat = parse_chat(body, id_required=True, max_bytes=policy.max_chat_body_bytes)
    if not is_valid_chat_id(chat_id):
        raise ApiError(400, "Invalid chat id")
    if chat.chat_id != chat_id:
        raise ApiError(400, "Chat ID mismatch")
    try:
        await request.app[CHAT_STORE].update(chat_id, chat)
    except ChatNotFound:
        raise ApiError(404, CHAT_NOT_FOUND) from None
    return json_response(SUCCESS)


async def list_chats(request: web.Request) -> web.Response:
    require_admin(request, request.app[CONFIG].admin_key)
    app = request.query.get("app")
    if not app:
        raise ApiError(400, "App parameter required")
    return json_bytes_response(await request.app[CHAT_STORE].list_json(app))


async def delete_chat(request: web.Request) -> web.Response:
    require_admin(request, request.app[CONFIG].admin_key)
    chat_id = request.match_info["chat_id"]
    if not is_valid_chat_id(chat_id):
        raise ApiError(404, CHAT_NOT_FOUND)
    await request.app[CHAT_STORE].delete(chat_id)
    return json_response(SUCCESS)
