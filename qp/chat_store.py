"""ChatStore: a chat's metadata in SQL and its messages in a blob store, kept consistent.

Every write changes SQL first (where the atomic checks live) and the blob second; when the
blob write fails, the SQL change is undone before the error goes out, so the previous state
stays intact. Per-chat locks keep readers from seeing one half of a write and keep
concurrent writes of one chat from mixing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging

import orjson

from qp.batches import BatchWriter
from qp.blobs import BlobStore, chat_key
from qp.chat_cache import ChatCache
from qp.chat_model import (
    ChatInput,
    ChatNotFound,
    ChatRow,
    is_messages_array,
    new_chat_id,
    render_chat,
)
from qp.db import Database
from qp.locks import ChatLocks
from qp.timestamps import utc_now_iso

log = logging.getLogger("qp.chat_store")

LIST_LIMIT = 100
# Blob fetches in flight at once for the admin list: 100 chats take two round trips to S3,
# yet one admin request cannot open a hundred connections.
LIST_FETCH_CONCURRENCY = 50


class ChatStore:
    def __init__(self, db: Database, blobs: BlobStore, cache: ChatCache):
        self._db = db
        self._blobs = blobs
        self._cache = cache
        self._locks = ChatLocks()
        # Writes whose blob is stored: their rows' `pending` is cleared in batches.
        self._settled = BatchWriter(db.settle_chats, "settled chat writes")

    async def close(self) -> None:
        await self._settled.close()

    async def ping(self) -> None:
        """Raises StorageUnavailable when the blob store does not answer."""
        await self._blobs.ping()

    # Writes run shielded: a client that leaves mid-request (which cancels its handler)
    # must not stop a write between its SQL and blob steps.

    async def create(self, chat: ChatInput, max_chats_per_app: int) -> str:
        """Store a new chat; raises ChatLimitExceeded or ChatExists, leaving stored chats alone."""
        return await asyncio.shield(self._create(chat, max_chats_per_app))

    async def _create(self, chat: ChatInput, max_chats_per_app: int) -> str:
        chat_id = chat.chat_id or new_chat_id()
        pending = _pending("create", chat.messages_json)
        async with self._locks.writing(chat_id):
            await self._db.insert_chat(chat_id, chat, utc_now_iso(), max_chats_per_app, pending)
            try:
                await self._blobs.put(chat_key(chat_id), chat.messages_json)
            except BaseException:
                await self._db.delete_chat(chat_id)
                raise
            finally:
                self._cache.discard(chat_id)
        self._settled.add((chat_id, pending))
        return chat_id

    async def get_json(self, chat_id: str) -> bytes | None:
        """The chat rendered as the contract's JSON; None when its row or messages are missing."""
        rendered = self._cache.get(chat_id)
        if rendered is not None:
            return rendered
        async with self._locks.reading(chat_id):
            row = await self._db.chat_row(chat_id)
            if row is None:
                return None
            return await self._render(row)

    async def update(self, chat_id: str, chat: ChatInput) -> None:
        """Replace messages, model and usage; raises ChatNotFound."""
        await asyncio.shield(self._update(chat_id, chat))

    async def _update(self, chat_id: str, chat: ChatInput) -> None:
        def pending(previous: ChatRow) -> str:
            return _pending("update", chat.messages_json, previous)

        async with self._locks.writing(chat_id):
            try:
                updated = await self._db.update_chat(chat_id, chat, utc_now_iso(), pending)
                if updated is None:
                    raise ChatNotFound
                previous, note = updated
                try:
                    await self._blobs.put(chat_key(chat_id), chat.messages_json)
                except BaseException:
                    await self._db.restore_chat(previous)
                    raise
            finally:
                self._cache.discard(chat_id)
        self._settled.add((chat_id, note))

    async def delete(self, chat_id: str) -> None:
        """Remove the row, then the blob (a retry after a failed blob delete removes it)."""
        await asyncio.shield(self._delete(chat_id))

    async def _delete(self, chat_id: str) -> None:
        async with self._locks.writing(chat_id):
            try:
                await self._db.delete_chat(chat_id)
                await self._blobs.delete(chat_key(chat_id))
            finally:
                self._cache.discard(chat_id)

    async def list_json(self, app: str, limit: int = LIST_LIMIT) -> bytes:
        """The app's newest chats by updated_at as a JSON array, skipping any whose messages
        are missing. Cached chats are current; the rest are fetched concurrently."""
        rows = await self._db.recent_chat_rows(app, limit)
        chats = {row.chat_id: self._cache.get(row.chat_id) for row in rows}
        missing = [chat_id for chat_id, chat in chats.items() if chat is None]
        if missing:
            async with self._locks.reading_all(missing):
                # Read again under the locks, so each row matches the blob fetched beside it.
                fresh = await self._db.chat_rows_by_id(missing)
                limiter = asyncio.Semaphore(LIST_FETCH_CONCURRENCY)

                async def render(row: ChatRow) -> bytes | None:
                    async with limiter:
                        return await self._render(row)

                rendered = await asyncio.gather(*(render(row) for row in fresh))
            chats.update(zip((row.chat_id for row in fresh), rendered, strict=True))
        return b"[" + b",".join(chat for chat in chats.values() if chat is not None) + b"]"

    async def recover(self) -> tuple[int, int]:
        """Finish or undo the writes a crash interrupted; answers (finished, undone).

        A write whose blob holds the messages it was writing is finished; otherwise the
        write is undone: a create's row is removed, an update's row is put back.
        """
        finished = undone = 0
        for row, pending in await self._db.pending_chats():
            intent = orjson.loads(pending)
            async with self._locks.writing(row.chat_id):
                if await blob_matches(self._blobs, row.chat_id, intent["sha256"]):
                    await self._db.settle_chats([(row.chat_id, pending)])
                    finished += 1
                elif intent["op"] == "create":
                    await self._db.delete_chat(row.chat_id)
                    undone += 1
                else:
                    await self._db.restore_chat(ChatRow(**intent["previous"]))
                    undone += 1
                self._cache.discard(row.chat_id)
        return finished, undone

    def forget_all(self) -> None:
        """Drop every cached chat (another process changed the database)."""
        self._cache.clear()

    async def _render(self, row: ChatRow) -> bytes | None:
        """Fetch the row's messages and render the chat; call with the chat's lock held."""
        messages = await self._blobs.get(chat_key(row.chat_id))
        if messages is None:
            return None
        if not is_messages_array(messages):
            # The id stays out of the log (it is a bearer secret); `check` finds the blob.
            log.error("a stored messages blob is not a JSON array; that chat is not served")
            return None
        rendered = render_chat(row, messages)
        self._cache.put(row.chat_id, rendered)
        return rendered


def messages_digest(messages_json: bytes) -> str:
    """SHA-256 of a messages array as stored: how a pending write knows its blob."""
    return hashlib.sha256(messages_json).hexdigest()


async def blob_matches(blobs: BlobStore, chat_id: str, digest: str) -> bool:
    """Whether the chat's blob holds the messages with this SHA-256 (a pending write's)."""
    stored = await blobs.get(chat_key(chat_id))
    return stored is not None and messages_digest(stored) == digest


def _pending(op: str, messages_json: bytes, previous: ChatRow | None = None) -> str:
    """The `pending` a write leaves on its row until its blob is stored."""
    intent = {"op": op, "sha256": messages_digest(messages_json)}
    if previous is not None:
        intent["previous"] = dataclasses.asdict(previous)
    return orjson.dumps(intent).decode()
