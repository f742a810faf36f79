"""The Chat as the contract defines it: validation, ids, timestamps, rendering."""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

import orjson

from qp.errors import ApiError, too_large

CHAT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
CHAT_ID_ALPHABET = string.ascii_letters + string.digits
GENERATED_ID_LENGTH = 21


class ChatLimitExceeded(Exception):
    """The app already has its maximum number of chats."""


class ChatExists(Exception):
    """A chat with that id is already stored."""


class ChatNotFound(Exception):
    """No chat with that id is stored."""


@dataclass(frozen=True, slots=True)
class ChatRow:
    """A chat's metadata as stored in SQL (table `chats`)."""

    chat_id: str
    app: str
    model: str
    prompt_tokens: float
    completion_tokens: float
    estimated_cost: float
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class ChatInput:
    """A validated chat from a request body; `messages_json` is the array as it will be stored."""

    chat_id: str | None
    app: str
    model: str
    messages_json: bytes
    prompt_tokens: float
    completion_tokens: float
    estimated_cost: float


def is_valid_chat_id(chat_id: str) -> bool:
    return CHAT_ID_PATTERN.fullmatch(chat_id) is not None


def new_chat_id() -> str:
    """21 characters drawn uniformly from A-Za-z0-9 by a cryptographic random source."""
    return "".join(secrets.choice(CHAT_ID_ALPHABET) for _ in range(GENERATED_ID_LENGTH))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_chat(body: Any, *, id_required: bool, max_bytes: int) -> ChatInput:
    """Validate `{"chat": Chat}` (contract checks 4 and 5); 400 or 413 as the contract says.

    With `id_required` false (create), a missing, null or empty `chatId` is allowed: the
    server generates one.
    """
    chat = body.get("chat") if isinstance(body, dict) else None
    if not isinstance(chat, dict):
        raise ApiError(400, "Invalid chat data")
    chat_id = chat.get("chatId")
    usage = chat.get("totalUsage")
    id_ok = isinstance(chat_id, str) or (not id_required and chat_id is None)
    if not (
        id_ok
        and isinstance(chat.get("app"), str)
        and isinstance(chat.get("model"), str)
        and isinstance(chat.get("messages"), list)
        and isinstance(usage, dict)
        and _is_number(usage.get("promptTokens"))
        and _is_number(usage.get("completionTokens"))
        and _is_number(usage.get("estimatedCost"))
    ):
        raise ApiError(400, "Invalid chat data")
    messages_json = orjson.dumps(chat["messages"])
    size = serialized_size(chat, messages_json)
    if size > max_bytes:
        raise too_large("Chat", size, max_bytes)
    return ChatInput(
        chat_id=chat_id or None,
        app=chat["app"],
        model=chat["model"],
        messages_json=messages_json,
        prompt_tokens=usage["promptTokens"],
        completion_tokens=usage["completionTokens"],
        estimated_cost=usage["estimatedCost"],
    )


def serialized_size(chat: dict[str, Any], messages_json: bytes) -> int:
    """len(orjson.dumps(chat)) without serialising the (possibly 10 MiB) messages twice."""
    rest = {key: value for key, value in chat.items() if key != "messages"}
    # `{...rest}` plus `,"messages":` and the array; with no other key, no comma.
    return len(orjson.dumps(rest)) + len(b',"messages":') + len(messages_json) - (0 if rest else 1)


def _js_number(value: float) -> float:
    """Render numbers as JavaScript does: an integral float has no `.0` (SQLite REAL gives 0.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def render_chat(row: ChatRow, messages_json: bytes) -> bytes:
    """The Chat JSON in the contract's key order, the stored messages spliced in unchanged."""
    head = orjson.dumps({"chatId": row.chat_id, "app": row.app, "model": row.model})
    tail = orjson.dumps(
        {
            "totalUsage": {
                "promptTokens": _js_number(row.prompt_tokens),
                "completionTokens": _js_number(row.completion_tokens),
                "estimatedCost": _js_number(row.estimated_cost),
            },
            "createdAt": row.created_at,
            "updatedAt": row.updated_at,
        }
    )
    return b"".join((head[:-1], b',"messages":', messages_json, b",", tail[1:]))


def is_messages_array(stored: bytes) -> bool:
    """True when stored bytes are a JSON array, so they can be spliced into a response as is."""
    try:
        return isinstance(orjson.loads(stored), list)
    except orjson.JSONDecodeError:
        return False
