"""ChatStore: a chat's metadata in SQL and its messages in a blob store, kept consistent.

Every write changes SQL first (where the atomic checks live) and the blob second; when the
blob write fails, the SQL change is undone before the error goes out, so the previous state
stays intact. Per-chat locks keep readers from seeing one half of a write and keep
concurrent writes of one chat from mixing.
"""

from __future__ import annotations

import asyncio
import logging

from qp.blobs import BlobStore, chat_key
from qp.chat_model import (
    ChatInput,
    ChatNotFound,
    ChatRow,
    is_messages_array,
    new_chat_id,
    utc_now_iso,
)
from qp.db import Database
from qp.locks import ChatLocks

log = logging.getLogger("qp.chat_store")

LIST_LIMIT = 100
# Blob fetches in flight at once for the admin list: enough to hide S3 latency, bounded so
# one admin request cannot open a hundred connections.
LIST_FETCH_CONCURRENCY = 16

StoredChat = tuple[ChatRow, bytes]


class ChatStore:
    def __init__(self, db: Database, blobs: BlobStore):
        self._db = db
        self._blobs = blobs
        self._locks = ChatLocks()

    async def create(self, chat: ChatInput, max_chats_per_app: int) -> str:
        """Store a new chat; raises ChatLimitExceeded or ChatExists, leaving stored chats alone."""
        chat_id = chat.chat_id or new_chat_id()
        async with self._locks.writing(chat_id):
            await self._db.insert_chat(chat_id, chat, utc_now_iso(), max_chats_per_app)
            try:
                await self._blobs.put(chat_key(chat_id), chat.messages_json)
            except BaseException:
                await self._db.delete_chat(chat_id)
                raise
        return chat_id

    async def get(self, chat_id: str) -> StoredChat | None:
        """The chat's row and stored messages; None when either is missing."""
        async with self._locks.reading(chat_id):
            row = await self._db.chat_row(chat_id)
            if row is None:
                return None
            messages = await self._blobs.get(chat_key(chat_id))
        return (row, messages) if self._servable(messages) else None

    async def update(self, chat_id: str, chat: ChatInput) -> None:
        """Replace messages, model and usage; raises ChatNotFound."""
        async with self._locks.writing(chat_id):
            previous = await self._db.update_chat(chat_id, chat, utc_now_iso())
            if previous is None:
                raise ChatNotFound
            try:
                await self._blobs.put(chat_key(chat_id), chat.messages_json)
            except BaseException:
                await self._db.restore_chat(previous)
                raise

    async def delete(self, chat_id: str) -> None:
        """Remove the row, then the blob (a retry after a failed blob delete removes it)."""
        async with self._locks.writing(chat_id):
            await self._db.delete_chat(chat_id)
            await self._blobs.delete(chat_key(chat_id))

    async def list_recent(self, app: str, limit: int = LIST_LIMIT) -> list[StoredChat]:
        """The app's newest chats by updated_at, skipping any whose messages are missing."""
        chat_ids = [row.chat_id for row in await self._db.recent_chat_rows(app, limit)]
        if not chat_ids:
            return []
        async with self._locks.reading_all(chat_ids):
            # Read again under the locks, so each row matches the blob fetched beside it.
            rows = await self._db.chat_rows_by_id(chat_ids)
            limiter = asyncio.Semaphore(LIST_FETCH_CONCURRENCY)

            async def fetch(row: ChatRow) -> bytes | None:
                async with limiter:
                    return await self._blobs.get(chat_key(row.chat_id))

            blobs = await asyncio.gather(*(fetch(row) for row in rows))
        return [
            (row, messages)
            for row, messages in zip(rows, blobs, strict=True)
            if self._servable(messages)
        ]

    @staticmethod
    def _servable(messages: bytes | None) -> bool:
        if messages is None:
            return False
        if not is_messages_array(messages):
            # The id stays out of the log (it is a bearer secret); `check` finds the blob.
            log.error("a stored messages blob is not a JSON array; that chat is not served")
            return False
        return True
