"""ChatStore: a chat's metadata in SQL and its messages in a blob store, copy-on-write.

A write puts its messages under a key of its own, `chats/{chatId}/{rev}.json` with a
fresh `rev`, and only then commits the row naming that revision: the commit is the one
moment a write takes effect. A write that fails, times out or dies before it leaves at
most a blob no row names, which is never served and is collected later (garbage.py).
Concurrent writes of one chat need no lock: the last commit wins.

A read takes the row, then the blob it names, so it always gets one whole write; no
database connection is held while the blob is read. A blob that has gone meanwhile was
superseded (deleted after a newer commit): the read takes the row again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from qp.chats.cache import ChatCache
from qp.chats.garbage import DEFAULT_ABANDON_SECONDS, ChatGarbage
from qp.chats.model import (
    ChatChanged,
    ChatExists,
    ChatInput,
    ChatLimitExceeded,
    ChatNotFound,
    ChatRow,
    StorageCapReached,
    WriteAbandoned,
    blob_key,
    chat_frame,
    new_chat_id,
    new_rev,
    parse_blob_key,
    render_chat,
    starts_like_an_array,
)
from qp.chats.sql import ChatRows
from qp.chats.stream import CHUNK_BYTES, ChatStream, read_to_end
from qp.chats.versions import CurrentVersions
from qp.errors import FULL, READ_ONLY, StorageUnavailable
from qp.storage.blobs import BlobStore
from qp.storage.database import Database
from qp.storage.disk import DiskSpace
from qp.storage.peers import Peers
from qp.timestamps import utc_now_iso

log = logging.getLogger("qp.chats.store")
T = TypeVar("T")

LIST_LIMIT = 100
# Chats of a list opened ahead of the one being sent (the list handler holds room for them).
LIST_READ_AHEAD = 24
# A read whose blob was superseded under it takes the row again, at most this often.
READ_ATTEMPTS = 5
# The id stays out of the log (it is a bearer secret); `check` finds the blob.
NOT_AN_ARRAY = "a stored messages blob is not a JSON array; that chat is not served"
# After a write failed for lack of space, /healthz tries a small write this often.
PROBE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class OpenedChat:
    """A chat as a read found it: its version (the ETag), and the contract's JSON, whole
    when small or as a stream; `body` is None when the client's copy is that version."""

    version: str
    body: bytes | ChatStream | None


class ChatStore:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        cache: ChatCache,
        peers: Peers,
        *,
        space: DiskSpace | None = None,
        abandon_seconds: float = DEFAULT_ABANDON_SECONDS,
    ):
        self._db = db
        self._rows = ChatRows(db)
        self._blobs = blobs
        self._cache = cache
        # Whether another process can have written since this one last looked (a cache
        # entry then needs a check against its row), and whether it would be heard.
        self._peers = peers
        self._versions = CurrentVersions(self._rows)
        peers.subscribe(self._changed_elsewhere)
        self._space = space
        self.garbage = ChatGarbage(self._rows, blobs, abandon_seconds)
        # Lists left early: closing what was opened ahead of them.
        self._closing: set[asyncio.Task[None]] = set()
        # Writes and deletes going on to their end after their callers left.
        self._unfinished: set[asyncio.Future[Any]] = set()
        # FULL or READ_ONLY after a write failed so; cleared by the next write that works.
        self.write_problem: str | None = None
        self._next_probe = 0.0

    async def close(self) -> None:
        await asyncio.gather(*self._closing, *self._unfinished, return_exceptions=True)
        await self.garbage.close()

    async def ping(self) -> None:
        """Raises StorageUnavailable when the blob store does not answer."""
        await self._blobs.ping()

    # --- writes --------------------------------------------------------------------------

    async def create(
        self, chat: ChatInput, max_chats_per_app: int, max_total_bytes: int = 0
    ) -> str:
        """Store a new chat; raises ChatLimitExceeded, ChatExists or StorageCapReached,
        leaving stored chats alone. `max_total_bytes` (0: none) caps all chats' messages
        together."""
        chat_id = chat.chat_id or new_chat_id()
        size = len(chat.messages_json)
        if self._space is not None:
            self._space.check_room()
        # Checked before the blob is put, so a refused create costs no blob; the commit
        # checks them all again, atomically.
        count, exists, stored = await self._rows.before_create(chat_id, chat.app)
        if max_total_bytes and stored + size > max_total_bytes:
            raise StorageCapReached
        if exists:
            raise ChatExists
        if count >= max_chats_per_app:
            raise ChatLimitExceeded

        async def commit(rev: str, now: str) -> ChatRow | None:
            await self._rows.commit_create(
                chat_id, chat, rev, now, max_chats_per_app, max_total_bytes
            )
            return None

        await self._write(chat_id, chat.messages_json, commit)
        return chat_id

    async def update(
        self,
        chat_id: str,
        chat: ChatInput,
        max_total_bytes: int = 0,
        if_match: Container[str] | None = None,
    ) -> str:
        """Replace messages, model and usage; answers the new version. ChatNotFound;
        ChatChanged when `if_match` is given and names no current version;
        StorageCapReached when it would grow the total past `max_total_bytes`."""
        if self._space is not None:
            self._space.check_room()
        current = await self._rows.one(chat_id)
        if current is None:
            raise ChatNotFound
        if if_match is not None and current.version not in if_match:
            raise ChatChanged
        growth = len(chat.messages_json) - (current.messages_bytes or 0)
        if (
            max_total_bytes
            and growth > 0
            and await self._rows.stored_bytes() + growth > max_total_bytes
        ):
            raise StorageCapReached

        async def commit(rev: str, now: str) -> ChatRow | None:
            return await self._rows.commit_update(
                chat_id, chat, rev, now, time.time(), if_match, max_total_bytes
            )

        return await self._write(chat_id, chat.messages_json, commit)

    async def _write(
        self,
        chat_id: str,
        messages_json: bytes,
        commit: Callable[[str, str], Awaitable[ChatRow | None]],
    ) -> str:
        """The one write sequence: the intent, the blob under a new revision, the commit.
        Shielded: a client that leaves mid-request (cancelling its handler) does not stop
        it half way; nothing would tear if it did, but its blob would wait for the sweep."""
        return await self._to_its_end(self._write_shielded(chat_id, messages_json, commit))

    def _to_its_end(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """`work`, shielded from its caller's cancellation: it goes on to its end, and the
        store's close waits for it. Once its caller has left, its outcome has no one to
        tell (it is marked heard, so asyncio does not log it as never retrieved)."""
        task = asyncio.ensure_future(work)
        self._unfinished.add(task)
        task.add_done_callback(self._finished)
        return asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()

    async def _write_shielded(
        self,
        chat_id: str,
        messages_json: bytes,
        commit: Callable[[str, str], Awaitable[ChatRow | None]],
    ) -> str:
        rev = new_rev()
        try:
            await self._rows.begin_write(chat_id, rev, time.time())
            # A put that fails or answers late may still land: its intent stays, so the
            # sweep deletes that blob once the write is given up, never before.
            await self._blobs.put(blob_key(chat_id, rev), messages_json)
            try:
                previous = await commit(rev, utc_now_iso())
            except (
                ChatExists,
                ChatLimitExceeded,
                ChatNotFound,
                ChatChanged,
                StorageCapReached,
            ) as refusal:
                await self._abandon(chat_id, rev, refusal)
                raise
            except WriteAbandoned:
                # Given up by the sweep, which may have deleted the blob before this put
                # landed: it is garbage again, as it can never be committed now.
                with contextlib.suppress(StorageUnavailable):
                    await self._rows.add_garbage([(chat_id, rev)], time.time())
                    self.garbage.collect_soon(chat_id, rev)
                raise StorageUnavailable(
                    "Storage", "the write was given up before it could commit"
                ) from None
        except StorageUnavailable as err:
            if err.reason in (FULL, READ_ONLY):
                self.write_problem = err.reason
            raise
        finally:
            self._cache.discard(chat_id)
        self.write_problem = None
        if previous is not None:
            self.garbage.collect_soon(chat_id, previous.blob_rev or "")
        return rev

    async def _abandon(self, chat_id: str, rev: str, refusal: Exception) -> None:
        """A commit refused (the chat exists, is gone, changed): its stored blob is garbage."""
        try:
            if await self._rows.abandon_write(chat_id, rev, time.time()):
                self.garbage.collect_soon(chat_id, rev)
        except StorageUnavailable as err:
            log.info("a refused write's blob is left for the sweep (%s): %s", refusal, err)

    def _changed_elsewhere(self, topic: str) -> None:
        """Another process changed a chat (or, topic "", perhaps anything): drop our copy."""
        if not topic:
            self._cache.clear()
        elif topic.startswith("chat:"):
            self._cache.discard(topic[len("chat:") :])

    async def delete(self, chat_id: str) -> None:
        """Remove the row; its blob is garbage from that commit on, and deleted before the
        answer (if the store fails, by the sweep)."""
        try:
            deleted = await self._to_its_end(self._rows.delete(chat_id, time.time()))
        finally:
            self._cache.discard(chat_id)
        if deleted is not None:
            await self._to_its_end(self.garbage.collect_now(chat_id, deleted))

    # --- reads ---------------------------------------------------------------------------

    async def open_chat(self, chat_id: str, current: Container[str] = ()) -> OpenedChat | None:
        """The chat, or None when its row or messages are missing. When its version is
        one of `current` (the client's copies), its body is not read."""
        cached = await self._cached(chat_id)
        if cached is not None:
            rendered, version = cached
            return OpenedChat(version, None if version in current else rendered)
        ticket = self._cache.ticket()  # before the row: a write committed after it shows
        row = await self._rows.one(chat_id)
        if row is None:
            return None
        if row.version in current:
            return OpenedChat(row.version, None)
        return await self._open_current(row, ticket)

    async def get_json(self, chat_id: str) -> bytes | None:
        """The chat's JSON, whole (the operators' tools; not for large chats on a server)."""
        chat = await self.open_chat(chat_id)
        if chat is None or chat.body is None:
            return None
        return await chat.body.read_all() if isinstance(chat.body, ChatStream) else chat.body

    async def newest_chats(
        self, app: str, limit: int = LIST_LIMIT
    ) -> AsyncGenerator[bytes | ChatStream, None]:
        """The app's newest chats by updated_at, one at a time (skipping any whose messages
        are missing), each as `open_chat` gives it. The next LIST_READ_AHEAD are opened
        meanwhile, so a list from S3 costs a few round trips, not one per chat."""
        ticket = self._cache.ticket()
        rows = iter(await self._rows.newest(app, limit))
        opening: collections.deque[asyncio.Task[OpenedChat | None]] = collections.deque()

        def open_next() -> None:
            row = next(rows, None)
            if row is not None:
                opening.append(asyncio.ensure_future(self._open_listed(row, ticket)))

        for _ in range(LIST_READ_AHEAD):
            open_next()
        try:
            while opening:
                # Shielded and still in `opening` while awaited: if this task is cancelled
                # meanwhile, the opening goes on and the closing below takes care of it.
                chat = await asyncio.shield(opening[0])
                opening.popleft()
                open_next()
                if chat is not None and chat.body is not None:
                    yield chat.body
        finally:
            if opening:
                # Left early (the client went away, perhaps cancelling this very task):
                # the openings finish in the background and what they opened is closed.
                closing = asyncio.ensure_future(_close_when_opened(list(opening)))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _open_listed(self, row: ChatRow, ticket: int) -> OpenedChat | None:
        entry = self._cache.get(row.chat_id)
        if entry is not None and entry[1] == row.version:
            return OpenedChat(row.version, entry[0])
        return await self._open_current(row, ticket)

    async def apps(self, limit: int) -> list[tuple[str, int, str]]:
        """(app, chats, latest updated_at) of the `limit` apps with the most chats."""
        return await self._rows.apps(limit)

    async def _cached(self, chat_id: str) -> tuple[bytes, str] | None:
        """The cached chat and its version, if any. While other processes may be writing
        to the database, only if its row still names that version: their announcements
        drop what they change, but one may not have been heard yet when its writer has
        already answered."""
        entry = self._cache.get(chat_id)
        if entry is None:
            return None
        if not self._peers.alone() and await self._versions.of(chat_id) != entry[1]:
            self._cache.discard(chat_id)
            return None
        return entry

    def forget_all(self) -> None:
        """Drop every cached chat (another process changed the database)."""
        self._cache.clear()

    async def _open_current(self, row: ChatRow, ticket: int) -> OpenedChat | None:
        """Open the blob `row` names; if it has gone (superseded meanwhile), the row again.
        `ticket` was taken before `row` was read, so what a later write replaced is never
        cached."""
        for _ in range(READ_ATTEMPTS):
            body = await self._open(row, ticket)
            if body is not None:
                return OpenedChat(row.version, body)
            again = await self._rows.one(row.chat_id)
            if again is None or again.version == row.version:
                return None  # deleted meanwhile, or its messages are missing
            row = again
        raise StorageUnavailable("Storage", "the chat changed under every read of it")

    async def _open(self, row: ChatRow, ticket: int) -> bytes | ChatStream | None:
        """Open the row's messages: a small chat is read and rendered (and cached), a large
        one left open to stream; None when its blob is missing or not an array. A chat its
        row knows to be small is read whole in one call (no file to spool it to, no reads
        of it piece by piece: a cold list is a hundred of these)."""
        if row.messages_bytes is not None and row.messages_bytes <= CHUNK_BYTES:
            data = await self._blobs.get(row.blob_key)
            if data is None:
                return None
            if len(data) <= CHUNK_BYTES:  # else the row was wrong: opened as a large one
                if not starts_like_an_array(data):
                    log.error(NOT_AN_ARRAY)
                    return None
                return self._rendered(row, data, ticket)
        reader = await self._blobs.open_reader(row.blob_key)
        if reader is None:
            return None
        try:
            first = await reader.read(CHUNK_BYTES)
            if not starts_like_an_array(first):
                log.error(NOT_AN_ARRAY)
                await reader.close()
                return None
            if reader.size <= CHUNK_BYTES:
                rest = await read_to_end(reader)
                await reader.close()
                return self._rendered(row, first + rest, ticket)
        except BaseException:
            await reader.close()
            raise
        head, tail = chat_frame(row)
        return ChatStream(head, first, reader, tail)

    def _rendered(self, row: ChatRow, messages: bytes, ticket: int) -> bytes:
        rendered = render_chat(row, messages)
        if self._peers.watching:  # else another process's change might go unheard
            self._cache.put(row.chat_id, rendered, row.version, ticket)
        return rendered

    # --- sizes and health ------------------------------------------------------------------

    async def unknown_sizes(self) -> int:
        """How many rows do not know the size of their messages (imported ones)."""
        return await self._rows.unknown_sizes()

    async def learn_sizes(self) -> int:
        """Fill in the sizes rows do not know (imported ones, at the worker's key) from the
        blob store's listing; answers how many were filled in."""
        unknown = set(await self._rows.of_unknown_size(limit=1_000_000))
        if not unknown:
            return 0
        sizes = []
        async for blob in self._blobs.listing("chats/"):
            parsed = parse_blob_key(blob.key)
            if parsed is not None and parsed[1] == "" and parsed[0] in unknown:
                sizes.append((blob.size, parsed[0]))
        for start in range(0, len(sizes), 1000):
            await self._rows.note_sizes(sizes[start : start + 1000])
        return len(sizes)

    async def current_write_problem(self) -> str | None:
        """`write_problem`, after a small real write to the database and the blob store (at
        most one every PROBE_SECONDS) to learn whether a full or read-only disk has mended."""
        if self.write_problem is not None and time.monotonic() >= self._next_probe:
            self._next_probe = time.monotonic() + PROBE_SECONDS
            with contextlib.suppress(StorageUnavailable):
                await self._db.probe_write()
                await self._blobs.probe_write()
                self.write_problem = None
        return self.write_problem


async def _close_when_opened(opening: list[asyncio.Task[OpenedChat | None]]) -> None:
    """Wait for chats being opened ahead of a list nobody reads any more; close their blobs.
    (Cancelled instead, an opening could leave a file its thread had just opened.)"""
    for opened in await asyncio.gather(*opening, return_exceptions=True):
        if isinstance(opened, OpenedChat) and isinstance(opened.body, ChatStream):
            await opened.body.blob.close()


CHAT_STORE = web.AppKey("chat_store", ChatStore)
