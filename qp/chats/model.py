"""The Chat as the contract defines it: validation, ids, rendering (timestamps come from
qp/timestamps.py)."""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from qp.errors import ApiError, too_large
from qp.text import is_storable_text

CHAT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
CHAT_ID_ALPHABET = string.ascii_letters + string.digits
GENERATED_ID_LENGTH = 21
# A chat's messages live at `chats/{chatId}/{rev}.json`, a key of each write's own; a row
# without a revision (the worker's chats) names the worker's key, `chats/{chatId}.json`.
BLOB_KEY = re.compile(rf"chats/({CHAT_ID_PATTERN.pattern})(?:/([A-Za-z0-9_-]{{1,64}}))?\.json")
REV_BYTES = 12


class ChatLimitExceeded(Exception):
    """The app already has its maximum number of chats."""


class ChatExists(Exception):
    """A chat with that id is already stored."""


class ChatNotFound(Exception):
    """No chat with that id is stored."""


class ChatChanged(Exception):
    """The chat's revision is not the one the client named (If-Match)."""


class StorageCapReached(Exception):
    """The write would take all chats' messages together past the total storage cap."""


class WriteAbandoned(Exception):
    """The write took so long that its blob was given up on before it could commit."""


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
    # Length of the stored messages array; None for rows imported without it.
    messages_bytes: int | None = None
    # The revision whose blob holds the messages; None: the worker's key (an imported row).
    blob_rev: str | None = None

    @property
    def version(self) -> str:
        """What names this write of the chat (its ETag): the revision, or for a row the
        worker wrote, its updated_at (which each of its writes changed)."""
        return self.blob_rev or self.updated_at

    @property
    def blob_key(self) -> str:
        return blob_key(self.chat_id, self.blob_rev)


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


def blob_key(chat_id: str, rev: str | None) -> str:
    """Where the messages of the chat's write `rev` live (None or "": the worker's key)."""
    return f"chats/{chat_id}/{rev}.json" if rev else f"chats/{chat_id}.json"


def parse_blob_key(key: str) -> tuple[str, str] | None:
    """(chat id, rev, "" for the worker's key) of a chat blob's key; None for any other."""
    match = BLOB_KEY.fullmatch(key)
    return (match.group(1), match.group(2) or "") if match else None


def new_rev() -> str:
    """A fresh revision: 16 URL-safe characters from a cryptographic source, never reused."""
    return secrets.token_urlsafe(REV_BYTES)


def new_chat_id() -> str:
    """21 characters drawn uniformly from A-Za-z0-9 by a cryptographic random source."""
    return "".join(secrets.choice(CHAT_ID_ALPHABET) for _ in range(GENERATED_ID_LENGTH))


# What SQL's INTEGER columns hold; a larger integer could be parsed but never stored. A
# float is held to the same range, so one rule says what a usage number may be.
INT64_MAX = 2**63 - 1


# The cost column is REAL: beyond 2^53 an integer would come back as another number.
COST_MAX = 2**53


def _is_number(value: Any, bound: int = INT64_MAX) -> bool:
    """A JSON number the database can store and give back as it was: within -bound..bound
    (a float strictly inside: the float nearest 2^63 - 1 is 2^63 itself, just outside)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -bound - 1 <= value <= bound
    return isinstance(value, float) and -bound - 1 < value < bound


def parse_chat(
    body: Any, *, id_required: bool, max_bytes: int, check_app: Callable[[str], None]
) -> ChatInput:
    """Validate `{"chat": Chat}` (contract checks 4 and 5); 400 or 413 as the contract says.

    With `id_required` false (create), a missing, null or empty `chatId` is allowed: the
    server generates one. `check_app` refuses an app name (400 Invalid app / Unknown app).
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
        and is_storable_text(chat["model"])
        and isinstance(chat.get("messages"), list)
        and isinstance(usage, dict)
        and _is_number(usage.get("promptTokens"))
        and _is_number(usage.get("completionTokens"))
        and _is_number(usage.get("estimatedCost"), COST_MAX)
    ):
        raise ApiError(400, "Invalid chat data")
    check_app(chat["app"])
    try:
        messages_json = orjson.dumps(chat["messages"])
        size = serialized_size(chat, messages_json)
    except orjson.JSONEncodeError:
        # Nested deeper than the encoder writes (orjson reads 1,024 levels, writes 254).
        raise ApiError(400, "Invalid chat data") from None
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


def chat_frame(row: ChatRow) -> tuple[bytes, bytes]:
    """The Chat JSON in the contract's key order around its messages: what comes before the
    stored array and what comes after it, so the array is sent as stored, never re-encoded."""
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
    return head[:-1] + b',"messages":', b"," + tail[1:]


def render_chat(row: ChatRow, messages_json: bytes) -> bytes:
    """The Chat JSON, the stored messages spliced in unchanged."""
    head, tail = chat_frame(row)
    return b"".join((head, messages_json, tail))


def starts_like_an_array(start: bytes) -> bool:
    """What a read can check of a stored array without parsing it: how it begins. Every
    array qp stores was written by a JSON encoder; `check` parses them all."""
    return start.lstrip(b" \t\r\n").startswith(b"[")


def is_messages_array(stored: bytes) -> bool:
    """True when stored bytes are a JSON array, so they can be spliced into a response as is."""
    try:
        return isinstance(orjson.loads(stored), list)
    except orjson.JSONDecodeError:
        return False
