"""ChatStore: a chat's metadata in SQL and its messages in a blob store, kept consistent.

Every write changes SQL first (where the atomic checks live), leaving on the row a
`pending` note that says how to finish or undo the write, then stores the blob, then
answers; the note is cleared in the background. When the blob write fails, the SQL change
is undone before the error goes out, so the previous state stays intact. Per-chat locks
(in this process, and in the database against the others sharing it) keep readers from
seeing one half of a write and keep concurrent writes of one chat from mixing.

A write is acknowledged only within `write_deadline` seconds of its SQL step, and (on a
shared database) only while this process's write lease holds. That is what lets `check
--repair` beside a live server, or another server, tell an abandoned write (older than
that; on a shared database, one whose process's lease expired) from one in flight, and
finish or undo it with statements conditional on the note, so that it can never clobber a
write that came after.

Over 300 lines because writes, reads and recovery share the locks, the cache and the
unresolved writes, and each must be read beside the others to see that a chat is never
served half written; the pieces that stand alone are in pending.py and stream.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from qp.chats.cache import ChatCache
from qp.chats.locks import ChatLocks
from qp.chats.model import (
    ChatInput,
    ChatNotFound,
    ChatRow,
    chat_frame,
    new_chat_id,
    render_chat,
    starts_like_an_array,
)
from qp.chats.pending import PendingWrite, blob_matches, make_note
from qp.chats.sql import ChatRows
from qp.chats.stream import CHUNK_BYTES, ChatStream, read_to_end
from qp.chats.versions import CurrentVersions
from qp.errors import FULL, READ_ONLY, StorageUnavailable, insufficient_storage
from qp.storage.batches import BatchWriter
from qp.storage.blobs import BlobStore, chat_key
from qp.storage.database import Database
from qp.storage.disk import DiskSpace
from qp.storage.leases import ABANDONED_AFTER_SECONDS, WriteLease, live_owners
from qp.timestamps import utc_now_iso

log = logging.getLogger("qp.chats.store")

LIST_LIMIT = 100
# Chats of a list opened ahead of the one being sent (the list handler holds room for them).
LIST_READ_AHEAD = 8
# Seconds a write may take from its SQL step to its answer; past it, it is undone and
# answered 503. The server sets it from QP_S3_TIMEOUT.
DEFAULT_WRITE_DEADLINE = 40.0
# After a write failed for lack of space, /healthz tries a small write this often.
PROBE_SECONDS = 5.0

FINISHED, UNDONE, UNCHANGED = "finished", "undone", "unchanged"


SqlStep = Callable[[ChatRows, str], Awaitable[PendingWrite]]


class ChatStore:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        cache: ChatCache,
        *,
        write_deadline: float = DEFAULT_WRITE_DEADLINE,
        space: DiskSpace | None = None,
        on_drop: Callable[[int], None] | None = None,
        lease: WriteLease | None = None,
    ):
        self._db = db
        self._rows = ChatRows(db)
        self._blobs = blobs
        self._cache = cache
        self._locks = ChatLocks()
        self._lease = lease
        self._owner = lease.owner if lease is not None else ""
        self._versions = CurrentVersions(self._rows)
        db.subscribe(self._changed_elsewhere)
        self._space = space
        self.write_deadline = write_deadline
        # Writes whose blob is stored: their rows' `pending` is cleared in batches.
        self._settled: BatchWriter[tuple[str, str]] = BatchWriter(
            self._rows.settle, "settled chat writes", on_drop
        )
        # Failed writes whose undo failed too (the database was down or full): their chats
        # answer 503 until a retry finishes or undoes them.
        self._unresolved: dict[str, PendingWrite] = {}
        # Lists left early: closing what was opened ahead of them.
        self._closing: set[asyncio.Task[None]] = set()
        # FULL or READ_ONLY after a write failed so; cleared by the next write that works.
        self.write_problem: str | None = None
        # Bytes of messages stored, all chats together, as the rows say (see count_stored).
        self.stored_bytes = 0
        self._next_probe = 0.0

    @property
    def settled(self) -> BatchWriter[tuple[str, str]]:
        return self._settled

    async def close(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self._settled.close()

    async def ping(self) -> None:
        """Raises StorageUnavailable when the blob store does not answer."""
        await self._blobs.ping()

    # --- writes --------------------------------------------------------------------------

    async def create(
        self, chat: ChatInput, max_chats_per_app: int, max_total_bytes: int = 0
    ) -> str:
        """Store a new chat; raises ChatLimitExceeded or ChatExists, leaving stored chats
        alone. `max_total_bytes` (0: none) caps all chats' messages together (507)."""
        chat_id = chat.chat_id or new_chat_id()
        note, digest, at = make_note("create", chat.messages_json, self._owner)

        async def insert(rows: ChatRows, now: str) -> PendingWrite:
            await rows.insert(chat_id, chat, now, max_chats_per_app, note)
            return PendingWrite(chat_id, note, "create", digest, at, now, None, self._owner)

        await self._write(chat_id, chat.messages_json, insert, max_total_bytes)
        return chat_id

    async def update(self, chat_id: str, chat: ChatInput, max_total_bytes: int = 0) -> None:
        """Replace messages, model and usage; raises ChatNotFound."""

        async def update(rows: ChatRows, now: str) -> PendingWrite:
            made: list[PendingWrite] = []

            def note_for(previous: ChatRow, updated_at: str) -> str:
                note, digest, at = make_note("update", chat.messages_json, self._owner, previous)
                made.append(
                    PendingWrite(
                        chat_id, note, "update", digest, at, updated_at, previous, self._owner
                    )
                )
                return note

            if await rows.update(chat_id, chat, now, note_for) is None:
                raise ChatNotFound
            return made[-1]

        await self._write(chat_id, chat.messages_json, update, max_total_bytes)

    async def _write(
        self, chat_id: str, messages_json: bytes, sql_step: SqlStep, max_total_bytes: int
    ) -> None:
        """The one write sequence: the SQL step (with its pending note), the blob, the answer.

        Shielded: a client that leaves mid-request (which cancels its handler) must not stop
        a write between its SQL and blob steps.
        """
        if self._space is not None:
            self._space.check_room()
        if max_total_bytes and self.stored_bytes + len(messages_json) > max_total_bytes:
            raise insufficient_storage()
        await asyncio.shield(self._write_shielded(chat_id, messages_json, sql_step))

    async def _write_shielded(self, chat_id: str, messages_json: bytes, sql_step: SqlStep) -> None:
        async with self._writing(chat_id) as rows:
            try:
                await self._resolve_earlier(rows, chat_id)
                started = time.monotonic()
                write = await sql_step(rows, utc_now_iso())
                try:
                    await self._blobs.put(chat_key(chat_id), messages_json)
                    if time.monotonic() - started > self.write_deadline:
                        raise StorageUnavailable(
                            "Storage", f"the write took over {self.write_deadline:g} s"
                        )
                    if self._lease is not None and not self._lease.holds():
                        # Another process may be undoing this write now: never answer for it.
                        raise StorageUnavailable("Database", "this process's write lease lapsed")
                except BaseException:
                    await self._undo(rows, write)
                    raise
            except StorageUnavailable as err:
                if err.reason in (FULL, READ_ONLY):
                    self.write_problem = err.reason
                raise
            finally:
                self._cache.discard(chat_id)
        self.write_problem = None
        self.stored_bytes += len(messages_json) - _size(write.previous)
        self._settled.add((chat_id, write.note))

    @asynccontextmanager
    async def _writing(self, chat_id: str) -> AsyncIterator[ChatRows]:
        """Hold the chat against every other reader and writer, in this process and in any
        other sharing the database; the rows are those of the session holding it."""
        async with (
            self._locks.writing(chat_id),
            self._db.locked(f"chat:{chat_id}") as session,
        ):
            yield ChatRows(session)

    @asynccontextmanager
    async def _reading(self, chat_id: str) -> AsyncIterator[ChatRows]:
        """Hold the chat against writers (here and in other processes) while it is read."""
        async with (
            self._locks.reading(chat_id),
            self._db.locked(f"chat:{chat_id}", shared=True) as session,
        ):
            yield ChatRows(session)

    def _changed_elsewhere(self, topic: str) -> None:
        """Another process changed a chat (or, topic "", perhaps anything): drop our copy."""
        if not topic:
            self._cache.clear()
        elif topic.startswith("chat:"):
            self._cache.discard(topic[len("chat:") :])

    async def _undo(self, rows: ChatRows, write: PendingWrite) -> None:
        """Undo a write whose blob failed; if even that fails, keep it to retry."""
        try:
            await self._undo_sql(rows, write)
        except StorageUnavailable as err:
            log.error("a failed chat write cannot be undone yet (%s); it will be retried", err)
            self._unresolved[write.chat_id] = write

    async def _undo_sql(self, rows: ChatRows, write: PendingWrite) -> bool:
        if write.op == "create":
            return await rows.undo_create(write.chat_id, write.note, write.updated_at)
        if write.previous is None:
            log.error("an interrupted update has no earlier row to go back to; left as it is")
            return False
        return await rows.undo_update(write.previous, write.note, write.updated_at)

    async def _resolve_earlier(self, rows: ChatRows, chat_id: str) -> None:
        """A new write of a chat whose failed write is still unresolved resolves it first."""
        earlier = self._unresolved.get(chat_id)
        if earlier is not None:
            await self._resolve(rows, earlier)
            del self._unresolved[chat_id]

    async def delete(self, chat_id: str) -> None:
        """Remove the row, then the blob (a retry after a failed blob delete removes it)."""
        await asyncio.shield(self._delete(chat_id))

    async def _delete(self, chat_id: str) -> None:
        async with self._writing(chat_id) as rows:
            try:
                self.stored_bytes -= await rows.delete(chat_id)
                self._unresolved.pop(chat_id, None)
                await self._blobs.delete(chat_key(chat_id))
            finally:
                self._cache.discard(chat_id)

    # --- reads ---------------------------------------------------------------------------

    async def open_chat(self, chat_id: str) -> bytes | ChatStream | None:
        """The chat as the contract's JSON: whole when small (and cached), else as a stream
        to send piece by piece; None when its row or messages are missing."""
        rendered = await self._cached(chat_id)
        if rendered is not None:
            return rendered
        async with self._reading(chat_id) as rows:
            if chat_id in self._unresolved:
                raise StorageUnavailable("Storage", "a failed write of this chat is not undone yet")
            row = await rows.one(chat_id)
            if row is None:
                return None
            # Opened under the lock, read after it: the open blob keeps what it held.
            return await self._open(row)

    async def get_json(self, chat_id: str) -> bytes | None:
        """The chat's JSON, whole (the operators' tools; not for large chats on a server)."""
        chat = await self.open_chat(chat_id)
        return await chat.read_all() if isinstance(chat, ChatStream) else chat

    async def newest_chats(
        self, app: str, limit: int = LIST_LIMIT
    ) -> AsyncGenerator[bytes | ChatStream, None]:
        """The app's newest chats by updated_at, one at a time (skipping any whose messages
        are missing), each as `open_chat` gives it. The next LIST_READ_AHEAD are opened
        meanwhile, so a list from S3 costs a few round trips, not one per chat."""
        rows = iter(await self._rows.newest(app, limit))
        opening: collections.deque[asyncio.Task[bytes | ChatStream | None]] = collections.deque()

        def open_next() -> None:
            row = next(rows, None)
            if row is not None:
                opening.append(asyncio.ensure_future(self._open_listed(row)))

        for _ in range(LIST_READ_AHEAD):
            open_next()
        try:
            while opening:
                # Shielded and still in `opening` while awaited: if this task is cancelled
                # meanwhile, the opening goes on and the closing below takes care of it.
                chat = await asyncio.shield(opening[0])
                opening.popleft()
                open_next()
                if chat is not None:
                    yield chat
        finally:
            if opening:
                # Left early (the client went away, perhaps cancelling this very task):
                # the openings finish in the background and what they opened is closed.
                closing = asyncio.ensure_future(_close_when_opened(list(opening)))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _open_listed(self, row: ChatRow) -> bytes | ChatStream | None:
        chat: bytes | ChatStream | None = await self._cached(row.chat_id, row.updated_at)
        if chat is not None:
            return chat
        async with self._reading(row.chat_id) as rows:
            if row.chat_id in self._unresolved:
                return None
            # Read again under the lock, so the row matches the blob opened beside it.
            fresh = await rows.one(row.chat_id)
            return await self._open(fresh) if fresh is not None else None

    async def apps(self, limit: int) -> list[tuple[str, int, str]]:
        """(app, chats, latest updated_at) of the `limit` apps with the most chats."""
        return await self._rows.apps(limit)

    async def _cached(self, chat_id: str, listed_at: str | None = None) -> bytes | None:
        """The cached chat, if any. While other processes may be writing to the database,
        only if its row is still the version it was rendered from (`listed_at`, when a list
        has just read the row): their announcements drop what they change, but one may not
        have been heard yet when its writer has already answered."""
        entry = self._cache.get_versioned(chat_id)
        if entry is None:
            return None
        if self._lease is not None and not self._lease.alone():
            stored = listed_at if listed_at is not None else await self._versions.of(chat_id)
            if stored != entry[1]:
                self._cache.discard(chat_id)
                return None
        return entry[0]

    def forget_all(self) -> None:
        """Drop every cached chat (another process changed the database)."""
        self._cache.clear()

    async def _open(self, row: ChatRow) -> bytes | ChatStream | None:
        """Open the row's messages: a small chat is read and rendered (and cached), a large
        one left open to stream. Call with the chat's lock held."""
        reader = await self._blobs.open_reader(chat_key(row.chat_id))
        if reader is None:
            return None
        try:
            first = await reader.read(CHUNK_BYTES)
            if not starts_like_an_array(first):
                # The id stays out of the log (it is a bearer secret); `check` finds the blob.
                log.error("a stored messages blob is not a JSON array; that chat is not served")
                await reader.close()
                return None
            if reader.size <= CHUNK_BYTES:
                rest = await read_to_end(reader)
                await reader.close()
                rendered = render_chat(row, first + rest)
                if self._db.watching:  # else another process's change might go unheard
                    self._cache.put(row.chat_id, rendered, row.updated_at or "")
                return rendered
        except BaseException:
            await reader.close()
            raise
        head, tail = chat_frame(row)
        return ChatStream(head, first, reader, tail)

    # --- finishing or undoing interrupted writes -------------------------------------------

    async def recover(
        self, older_than: float | None = None, live_owners: set[str] | None = None
    ) -> dict[str, int]:
        """Finish or undo the writes a stop interrupted; counts by outcome.

        With the claim held (SQLite: start-up, or `check --repair` with the server down)
        every pending write is abandoned. On a shared database, a write is abandoned once
        its process's lease has expired (it is not in `live_owners`). Beside a live server,
        a write whose note names no process is abandoned only once its SQL step is older
        than `older_than` seconds. Each change is conditional on the note, so a write that
        moved on meanwhile is left alone (`unchanged`). A write whose blob holds its
        messages is finished; any other is undone (a create's row removed, an update's row
        put back). One that cannot be resolved now (the store is down) is `unresolved`.
        """
        counts = {FINISHED: 0, UNDONE: 0, UNCHANGED: 0, "unresolved": 0}
        now = time.time()
        for row, note in await self._rows.pending():
            write = PendingWrite.read(row, note)
            if write is None:
                counts["unresolved"] += 1
                continue
            if live_owners is not None and write.owner:
                if write.owner in live_owners:
                    continue
            elif older_than is not None and now - write.at < older_than:
                continue
            async with self._writing(write.chat_id) as rows:
                try:
                    outcome = await self._resolve(rows, write)
                except StorageUnavailable as err:
                    log.warning("an interrupted chat write cannot be resolved yet: %s", err)
                    self._unresolved[write.chat_id] = write
                    outcome = "unresolved"
                self._cache.discard(write.chat_id)
            counts[outcome] += 1
        return counts

    async def resolve_abandoned(self, cause: str) -> dict[str, int]:
        """Finish or undo the writes nobody will finish: on SQLite (under its claim) every
        interrupted one, on a shared database those of processes whose lease expired (and
        notes naming none, once older than the write deadline and a margin). Logs what
        was done, naming `cause` (what interrupted them)."""
        older_than = self.write_deadline + ABANDONED_AFTER_SECONDS if self._db.shared else None
        counts = await self.recover(older_than, await live_owners(self._db))
        if counts[FINISHED] or counts[UNDONE]:
            log.warning(
                "resolved %d chat writes %s: %d finished, %d undone",
                counts[FINISHED] + counts[UNDONE],
                cause,
                counts[FINISHED],
                counts[UNDONE],
            )
        return counts

    async def retry_unresolved(self) -> None:
        """Try again to finish or undo the failed writes that could not be undone."""
        for chat_id, write in list(self._unresolved.items()):
            async with self._writing(chat_id) as rows:
                if self._unresolved.get(chat_id) is not write:
                    continue
                try:
                    await self._resolve(rows, write)
                except StorageUnavailable:
                    continue
                del self._unresolved[chat_id]
                self._cache.discard(chat_id)
            log.info("a failed chat write was resolved on retry")

    async def _resolve(self, rows: ChatRows, write: PendingWrite) -> str:
        """Finish the write if its blob holds its messages, else undo it; both only while
        the row still carries its note. Call with the chat's write lock held (`rows` are
        its session's)."""
        if await blob_matches(self._blobs, write.chat_id, write.sha256):
            changed = await rows.finish_write(write.chat_id, write.note, write.updated_at)
            return FINISHED if changed else UNCHANGED
        return UNDONE if await self._undo_sql(rows, write) else UNCHANGED

    @property
    def unresolved_count(self) -> int:
        return len(self._unresolved)

    async def count_stored(self) -> int:
        """Take the stored total from the rows again (at start, after outside changes);
        answers how many rows do not know their size."""
        self.stored_bytes, unknown = await self._rows.stored_bytes()
        return unknown

    async def learn_sizes(self) -> int:
        """Fill in the sizes rows do not know (imported ones) from the blob store's listing;
        answers how many were filled in."""
        unknown = set(await self._rows.of_unknown_size(limit=1_000_000))
        if not unknown:
            return 0
        sizes = []
        async for blob in self._blobs.listing("chats/"):
            chat_id = blob.key[len("chats/") : -len(".json")]
            if chat_id in unknown:
                sizes.append((blob.size, chat_id))
        for start in range(0, len(sizes), 1000):
            await self._rows.note_sizes(sizes[start : start + 1000])
        await self.count_stored()
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


def _size(row: ChatRow | None) -> int:
    return (row.messages_bytes or 0) if row is not None else 0


async def _close_when_opened(opening: list[asyncio.Task[bytes | ChatStream | None]]) -> None:
    """Wait for chats being opened ahead of a list nobody reads any more; close their blobs.
    (Cancelled instead, an opening could leave a file its thread had just opened.)"""
    for opened in await asyncio.gather(*opening, return_exceptions=True):
        if isinstance(opened, ChatStream):
            await opened.blob.close()
