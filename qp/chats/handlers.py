"""Handlers for /api/chats: parse and validate, call the ChatStore, shape the answer.

Chats can be 10 MiB: a request body is charged to the in-flight bytes (QP_MAX_INFLIGHT_MB)
before it is read, and a chat read is sent in pieces when large, so what clients send and
ask for never decides how much memory the server takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Container, Iterator
from contextlib import asynccontextmanager, contextmanager

from aiohttp import hdrs, web

from qp.bodies import body_allowance, read_json
from qp.chats.model import (
    ChatChanged,
    ChatExists,
    ChatInput,
    ChatLimitExceeded,
    ChatNotFound,
    StorageCapReached,
    is_valid_chat_id,
    parse_chat,
)
from qp.chats.store import CHAT_STORE, LIST_READ_AHEAD
from qp.chats.stream import CHUNK_BYTES, ChatStream
from qp.config import CONFIG
from qp.errors import (
    ApiError,
    StorageUnavailable,
    insufficient_storage,
    json_bytes_response,
    json_response,
)
from qp.logs import CLIENT_HASH
from qp.policy.policy import INVALID_APP, POLICY, Policy
from qp.protection.admin import require_admin
from qp.protection.inflight_bytes import INFLIGHT_BYTES
from qp.protection.quota import DAILY_QUOTA
from qp.text import is_storable_text

log = logging.getLogger("qp.chats.handlers")

CHAT_NOT_FOUND = "Chat not found"
CHAT_CHANGED = "Chat changed"
SUCCESS = {"success": True}
GIB = 1024**3
# What a read holds of the in-flight bytes while it runs: a small chat whole, or a piece of a
# large one and its rendering.
READ_HOLD_BYTES = 2 * CHUNK_BYTES
# A list: the chat being sent, and those opened ahead of it.
LIST_HOLD_BYTES = (LIST_READ_AHEAD + 1) * CHUNK_BYTES


async def create_chat(request: web.Request) -> web.Response:
    policy = request.app[POLICY].current
    async with _received_chat(request, policy, id_required=False) as chat:
        if chat.chat_id is not None and not is_valid_chat_id(chat.chat_id):
            raise ApiError(400, "Invalid chat id")
        try:
            with _charged(request, chat):
                chat_id = await request.app[CHAT_STORE].create(
                    chat, policy.max_chats_per_app, _total_cap(policy)
                )
        except ChatLimitExceeded:
            limit = policy.max_chats_per_app
            raise ApiError(
                400, f"Chat limit exceeded for app {chat.app}. Maximum {limit} chats allowed."
            ) from None
        except ChatExists:
            raise ApiError(409, "Chat already exists") from None
        except StorageCapReached:
            raise insufficient_storage() from None
    return json_response({"chatId": chat_id})


async def get_chat(request: web.Request) -> web.StreamResponse:
    chat_id = request.match_info["chat_id"]
    current = _entity_tags(request.headers.get(hdrs.IF_NONE_MATCH), weak=True) or ()
    async with request.app[INFLIGHT_BYTES].hold(READ_HOLD_BYTES):
        store = request.app[CHAT_STORE]
        chat = await store.open_chat(chat_id, current) if is_valid_chat_id(chat_id) else None
        if chat is None:
            raise ApiError(404, CHAT_NOT_FOUND)
        etag: dict[str, str] = {hdrs.ETAG: _etag(chat.version)}
        if chat.body is None:
            return web.Response(status=304, headers=etag)
        if isinstance(chat.body, bytes):
            return json_bytes_response(chat.body, headers=etag)
        response = _streamed_json(chat.body.size)
        response.headers.update(etag)
        await response.prepare(request)
        await _send(request, response, chat.body.pieces())
        return response


async def update_chat(request: web.Request) -> web.Response:
    chat_id = request.match_info["chat_id"]
    policy = request.app[POLICY].current
    async with _received_chat(request, policy, id_required=True) as chat:
        if not is_valid_chat_id(chat_id):
            raise ApiError(400, "Invalid chat id")
        if chat.chat_id != chat_id:
            raise ApiError(400, "Chat ID mismatch")
        if_match = _entity_tags(request.headers.get(hdrs.IF_MATCH), weak=False)
        try:
            with _charged(request, chat):
                version = await request.app[CHAT_STORE].update(
                    chat_id, chat, _total_cap(policy), if_match
                )
        except ChatNotFound:
            raise ApiError(404, CHAT_NOT_FOUND) from None
        except ChatChanged:
            raise ApiError(412, CHAT_CHANGED) from None
        except StorageCapReached:
            raise insufficient_storage() from None
    response = json_response(SUCCESS)
    response.headers[hdrs.ETAG] = _etag(version)
    return response


async def list_chats(request: web.Request) -> web.StreamResponse:
    """The app's newest chats, sent one after another as they are read: a list of a
    hundred 10 MiB chats never sits in memory whole."""
    require_admin(request, request.app[CONFIG].admin_key)
    app = request.query.get("app")
    if not app:
        raise ApiError(400, "App parameter required")
    if not is_storable_text(app):
        raise ApiError(400, INVALID_APP)
    async with (
        request.app[INFLIGHT_BYTES].hold(LIST_HOLD_BYTES),
        contextlib.aclosing(request.app[CHAT_STORE].newest_chats(app)) as chats,
    ):
        # The first chat is read before answering: a store that is down is still a 503.
        first = await anext(chats, None)
        response = _streamed_json(None)
        await response.prepare(request)
        await _send(request, response, _json_array(first, chats))
        return response


async def delete_chat(request: web.Request) -> web.Response:
    require_admin(request, request.app[CONFIG].admin_key)
    chat_id = request.match_info["chat_id"]
    if not is_valid_chat_id(chat_id):
        raise ApiError(404, CHAT_NOT_FOUND)
    await request.app[CHAT_STORE].delete(chat_id)
    return json_response(SUCCESS)


@asynccontextmanager
async def _received_chat(
    request: web.Request, policy: Policy, *, id_required: bool
) -> AsyncIterator[ChatInput]:
    """The body's chat, validated, while the in-flight bytes hold what it takes: the body's
    size while it is read and parsed, then twice its messages (kept, and written)."""
    async with request.app[INFLIGHT_BYTES].hold(
        body_allowance(request, policy.max_chat_body_bytes)
    ) as held:
        chat = parse_chat(
            await read_json(request, policy.max_chat_body_bytes, policy),
            id_required=id_required,
            max_bytes=policy.max_chat_body_bytes,
            check_app=policy.check_app,
        )
        held.shrink_to(2 * len(chat.messages_json))
        yield chat


@contextmanager
def _charged(request: web.Request, chat: ChatInput) -> Iterator[None]:
    """Count the chat's bytes against its client's daily quota (429 when over); given back
    if the write does not happen."""
    quota, client, size = request.app[DAILY_QUOTA], request[CLIENT_HASH], len(chat.messages_json)
    quota.take(client, size, request.app[POLICY].current.max_chat_bytes_per_client_daily)
    try:
        yield
    except BaseException:
        quota.give_back(client, size)
        raise


def _etag(version: str) -> str:
    return f'"{version}"'


class _EveryVersion:
    """`If-None-Match: *`: whatever version the chat has, the client has it."""

    def __contains__(self, version: object) -> bool:
        return True


def _entity_tags(header: str | None, *, weak: bool) -> Container[str] | None:
    """The versions an If-None-Match (`weak`: W/ tags compare too) or If-Match (strong
    comparison: a weak tag matches nothing) header names; None when absent, and for `*`
    in If-Match (any version: a PUT needs its chat to exist anyway)."""
    if header is None:
        return None
    tags = {tag.strip() for tag in header.split(",")}
    if "*" in tags:
        return _EveryVersion() if weak else None
    if weak:
        tags = {tag.removeprefix("W/") for tag in tags}
    return frozenset(tag[1:-1] for tag in tags if len(tag) >= 2 and tag[0] == tag[-1] == '"')


def _total_cap(policy: Policy) -> int:
    return int(policy.max_total_storage_gb * GIB)


def _streamed_json(size: int | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if size is not None:
        response.content_length = size
    return response


async def _json_array(
    first: bytes | ChatStream | None, rest: AsyncGenerator[bytes | ChatStream, None]
) -> AsyncGenerator[bytes, None]:
    yield b"["
    chat = first
    separator = b""
    try:
        while chat is not None:
            yield separator
            separator = b","
            if isinstance(chat, bytes):
                yield chat
            else:
                stream, chat = chat, None  # from here on, its pieces close its blob
                async with contextlib.aclosing(stream.pieces()) as pieces:
                    async for piece in pieces:
                        yield piece
            chat = await anext(rest, None)
        yield b"]"
    finally:
        if isinstance(chat, ChatStream):  # the client left before it was begun
            await chat.blob.close()


async def _send(
    request: web.Request, response: web.StreamResponse, pieces: AsyncGenerator[bytes, None]
) -> None:
    """Write the pieces, each within the policy's body idle timeout (a client that stops
    reading does not hold the chat's blob open for ever). Once the answer has begun, a
    failure can only cut it short: the client sees a truncated body."""
    quiet = request.app[POLICY].current.body_idle_timeout
    try:
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                async with asyncio.timeout(quiet):
                    await response.write(piece)
        await response.write_eof()
    except (TimeoutError, StorageUnavailable, ConnectionError) as err:
        log.warning("a chat answer was cut short: %s", type(err).__name__)
        if request.transport is not None:
            request.transport.close()
