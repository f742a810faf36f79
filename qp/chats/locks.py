"""Per-chat reader/writer locks, so a chat is read and written as one piece.

A chat is a row in SQL and a blob in the store; no single transaction spans both. Within
this process, a writer (create, update, delete) holds the chat's write lock across both
steps, and readers hold its read lock, so nobody sees one half of a write. Against other
processes sharing the database, ChatStore also holds the chat's advisory lock there
(`Database.locked`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiorwlock


class ChatLocks:
    def __init__(self) -> None:
        # chat id -> [lock, holders and waiters]; an entry lives only while someone uses it.
        self._entries: dict[str, list[Any]] = {}

    @asynccontextmanager
    async def reading(self, chat_id: str) -> AsyncIterator[None]:
        async with self._hold(chat_id, write=False):
            yield

    @asynccontextmanager
    async def writing(self, chat_id: str) -> AsyncIterator[None]:
        async with self._hold(chat_id, write=True):
            yield

    @asynccontextmanager
    async def reading_all(self, chat_ids: Iterable[str]) -> AsyncIterator[None]:
        """Read locks on several chats. A writer only ever holds one chat, so no deadlock."""
        async with AsyncExitStack() as stack:
            for chat_id in sorted(set(chat_ids)):
                await stack.enter_async_context(self.reading(chat_id))
            yield

    @asynccontextmanager
    async def _hold(self, chat_id: str, write: bool) -> AsyncIterator[None]:
        entry = self._entries.get(chat_id)
        if entry is None:
            entry = self._entries[chat_id] = [aiorwlock.RWLock(fast=True), 0]
        entry[1] += 1
        try:
            lock = entry[0]
            async with lock.writer if write else lock.reader:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[chat_id]

    @property
    def in_use(self) -> int:
        """Chats whose lock someone holds or waits for now; the registry keeps no others."""
        return len(self._entries)
