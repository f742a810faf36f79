"""ChatStore: a chat's metadata in SQL and its messages in a blob store, kept consistent.

Every write changes SQL first (where the atomic checks live), leaving on the row a
`pending` note that says how to finish or undo the write, then stores the blob, then
answers; the note is cleared in the background. When the blob write fails, the SQL change
is undone before the error goes out, so the previous state stays intact. Per-chat locks
keep readers from seeing one half of a write and keep concurrent writes of one chat from
mixing.

A write is acknowledged only within `write_deadline` seconds of its SQL step. That is what
lets `check --repair` beside a live server tell an abandoned write (older than that) from
one in flight, and finish or undo it with statements conditional on the note, so that it
can never clobber a write that came after.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
from qp.disk import DiskSpace
from qp.errors import FULL, READ_ONLY, StorageUnavailable
from qp.locks import ChatLocks
from qp.timestamps import epoch_seconds, utc_now_iso

log = logging.getLogger("qp.chat_store")

LIST_LIMIT = 100
# Blob fetches in flight at once for the admin list: 100 chats take two round trips to S3,
# yet one admin request cannot open a hundred connections.
LIST_FETCH_CONCURRENCY = 50
# Seconds a write may take from its SQL step to its answer; past it, it is undone and
# answered 503. The server sets it from QP_S3_TIMEOUT.
DEFAULT_WRITE_DEADLINE = 40.0
# After a write failed for lack of space, /healthz tries a small write this often.
PROBE_SECONDS = 5.0

FINISHED, UNDONE, UNCHANGED = "finished", "undone", "unchanged"


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A chat write between its SQL step and its blob: what finishing or undoing it takes."""

    chat_id: str
    note: str  # the row's `pending` while the write is unfinished
    op: str  # create or update
    sha256: str  # of the messages the write stores
    at: float  # epoch seconds of its SQL step
    updated_at: str  # the row's updated_at as the write left it
    previous: ChatRow | None  # an update's row as it was

    @classmethod
    def read(cls, row: ChatRow, note: str) -> PendingWrite | None:
        """The write a row's note describes; None (logged) for a note that is not one of
        ours, which is left for the operator rather than guessed at."""
        try:
            intent = orjson.loads(note)
            previous = intent.get("previous")
            write = cls(
                chat_id=row.chat_id,
                note=note,
                op=intent["op"],
                sha256=intent["sha256"],
                # Notes written before `at` existed: the row's own time is the SQL step's.
                at=float(intent.get("at", epoch_seconds(row.updated_at))),
                updated_at=row.updated_at,
                previous=ChatRow(**previous) if previous else None,
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            log.error("a chat row's pending note cannot be read; `check` lists it")
            return None
        if write.op not in ("create", "update"):
            log.error("a chat row's pending note cannot be read; `check` lists it")
            return None
        return write


SqlStep = Callable[[str], Awaitable[PendingWrite]]


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
    ):
        self._db = db
        self._blobs = blobs
        self._cache = cache
        self._locks = ChatLocks()
        self._space = space
        self.write_deadline = write_deadline
        # Writes whose blob is stored: their rows' `pending` is cleared in batches.
        self._settled: BatchWriter[tuple[str, str]] = BatchWriter(
            db.settle_chats, "settled chat writes", on_drop
        )
        # Failed writes whose undo failed too (the database was down or full): their chats
        # answer 503 until a retry finishes or undoes them.
        self._unresolved: dict[str, PendingWrite] = {}
        # FULL or READ_ONLY after a write failed so; cleared by the next write that works.
        self.write_problem: str | None = None
        self._next_probe = 0.0

    @property
    def settled(self) -> BatchWriter[tuple[str, str]]:
        return self._settled

    async def close(self) -> None:
        await self._settled.close()

    async def ping(self) -> None:
        """Raises StorageUnavailable when the blob store does not answer."""
        await self._blobs.ping()

    # --- writes --------------------------------------------------------------------------

    async def create(self, chat: ChatInput, max_chats_per_app: int) -> str:
        """Store a new chat; raises ChatLimitExceeded or ChatExists, leaving stored chats alone."""
        chat_id = chat.chat_id or new_chat_id()
        note, digest, at = _note("create", chat.messages_json)

        async def insert(now: str) -> PendingWrite:
            await self._db.insert_chat(chat_id, chat, now, max_chats_per_app, note)
            return PendingWrite(chat_id, note, "create", digest, at, now, None)

        await self._write(chat_id, chat.messages_json, insert)
        return chat_id

    async def update(self, chat_id: str, chat: ChatInput) -> None:
        """Replace messages, model and usage; raises ChatNotFound."""

        async def update(now: str) -> PendingWrite:
            made: list[PendingWrite] = []

            def note_for(previous: ChatRow) -> str:
                note, digest, at = _note("update", chat.messages_json, previous)
                made.append(PendingWrite(chat_id, note, "update", digest, at, now, previous))
                return note

            if await self._db.update_chat(chat_id, chat, now, note_for) is None:
                raise ChatNotFound
            return made[-1]

        await self._write(chat_id, chat.messages_json, update)

    async def _write(self, chat_id: str, messages_json: bytes, sql_step: SqlStep) -> None:
        """The one write sequence: the SQL step (with its pending note), the blob, the answer.

        Shielded: a client that leaves mid-request (which cancels its handler) must not stop
        a write between its SQL and blob steps.
        """
        if self._space is not None:
            self._space.check_room()
        await asyncio.shield(self._write_shielded(chat_id, messages_json, sql_step))

    async def _write_shielded(self, chat_id: str, messages_json: bytes, sql_step: SqlStep) -> None:
        async with self._locks.writing(chat_id):
            try:
                await self._resolve_earlier(chat_id)
                started = time.monotonic()
                write = await sql_step(utc_now_iso())
                try:
                    await self._blobs.put(chat_key(chat_id), messages_json)
                    if time.monotonic() - started > self.write_deadline:
                        raise StorageUnavailable(
                            "Storage", f"the write took over {self.write_deadline:g} s"
                        )
                except BaseException:
                    await self._undo(write)
                    raise
            except StorageUnavailable as err:
                if err.reason in (FULL, READ_ONLY):
                    self.write_problem = err.reason
                raise
            finally:
                self._cache.discard(chat_id)
        self.write_problem = None
        self._settled.add((chat_id, write.note))

    async def _undo(self, write: PendingWrite) -> None:
        """Undo a write whose blob failed; if even that fails, keep it to retry."""
        try:
            await self._undo_sql(write)
        except StorageUnavailable as err:
            log.error("a failed chat write cannot be undone yet (%s); it will be retried", err)
            self._unresolved[write.chat_id] = write

    async def _undo_sql(self, write: PendingWrite) -> bool:
        if write.op == "create":
            return await self._db.undo_create(write.chat_id, write.note, write.updated_at)
        if write.previous is None:
            log.error("an interrupted update has no earlier row to go back to; left as it is")
            return False
        return await self._db.undo_update(write.previous, write.note, write.updated_at)

    async def _resolve_earlier(self, chat_id: str) -> None:
        """A new write of a chat whose failed write is still unresolved resolves it first."""
        earlier = self._unresolved.get(chat_id)
        if earlier is not None:
            await self._resolve(earlier)
            del self._unresolved[chat_id]

    async def delete(self, chat_id: str) -> None:
        """Remove the row, then the blob (a retry after a failed blob delete removes it)."""
        await asyncio.shield(self._delete(chat_id))

    async def _delete(self, chat_id: str) -> None:
        async with self._locks.writing(chat_id):
            try:
                await self._db.delete_chat(chat_id)
                self._unresolved.pop(chat_id, None)
                await self._blobs.delete(chat_key(chat_id))
            finally:
                self._cache.discard(chat_id)

    # --- reads ---------------------------------------------------------------------------

    async def get_json(self, chat_id: str) -> bytes | None:
        """The chat rendered as the contract's JSON; None when its row or messages are missing."""
        rendered = self._cache.get(chat_id)
        if rendered is not None:
            return rendered
        async with self._locks.reading(chat_id):
            if chat_id in self._unresolved:
                raise StorageUnavailable("Storage", "a failed write of this chat is not undone yet")
            row = await self._db.chat_row(chat_id)
            if row is None:
                return None
            return await self._render(row)

    async def list_json(self, app: str, limit: int = LIST_LIMIT) -> bytes:
        """The app's newest chats by updated_at as a JSON array, skipping any whose messages
        are missing. Cached chats are current; the rest are fetched concurrently."""
        rows = await self._db.recent_chat_rows(app, limit)
        chats = {row.chat_id: self._cache.get(row.chat_id) for row in rows}
        missing = [chat_id for chat_id, chat in chats.items() if chat is None]
        if missing:
            async with self._locks.reading_all(missing):
                # Read again under the locks, so each row matches the blob fetched beside it.
                fresh = [
                    row
                    for row in await self._db.chat_rows_by_id(missing)
                    if row.chat_id not in self._unresolved
                ]
                limiter = asyncio.Semaphore(LIST_FETCH_CONCURRENCY)

                async def render(row: ChatRow) -> bytes | None:
                    async with limiter:
                        return await self._render(row)

                rendered = await asyncio.gather(*(render(row) for row in fresh))
            chats.update(zip((row.chat_id for row in fresh), rendered, strict=True))
        return b"[" + b",".join(chat for chat in chats.values() if chat is not None) + b"]"

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

    # --- finishing or undoing interrupted writes -------------------------------------------

    async def recover(self, older_than: float | None = None) -> dict[str, int]:
        """Finish or undo the writes a stop interrupted; counts by outcome.

        With the claim held (start-up, or `check --repair` with the server down) every
        pending write is abandoned. Beside a live server, only those whose SQL step is
        older than `older_than` seconds are; each change is conditional on the note, so a
        write that moved on meanwhile is left alone (`unchanged`). A write whose blob holds
        its messages is finished; any other is undone (a create's row removed, an update's
        row put back). One that cannot be resolved now (the store is down) is `unresolved`.
        """
        counts = {FINISHED: 0, UNDONE: 0, UNCHANGED: 0, "unresolved": 0}
        now = time.time()
        for row, note in await self._db.pending_chats():
            write = PendingWrite.read(row, note)
            if write is None:
                counts["unresolved"] += 1
                continue
            if older_than is not None and now - write.at < older_than:
                continue
            async with self._locks.writing(write.chat_id):
                try:
                    outcome = await self._resolve(write)
                except StorageUnavailable as err:
                    log.warning("an interrupted chat write cannot be resolved yet: %s", err)
                    self._unresolved[write.chat_id] = write
                    outcome = "unresolved"
                self._cache.discard(write.chat_id)
            counts[outcome] += 1
        return counts

    async def retry_unresolved(self) -> None:
        """Try again to finish or undo the failed writes that could not be undone."""
        for chat_id, write in list(self._unresolved.items()):
            async with self._locks.writing(chat_id):
                if self._unresolved.get(chat_id) is not write:
                    continue
                try:
                    await self._resolve(write)
                except StorageUnavailable:
                    continue
                del self._unresolved[chat_id]
                self._cache.discard(chat_id)
            log.info("a failed chat write was resolved on retry")

    async def _resolve(self, write: PendingWrite) -> str:
        """Finish the write if its blob holds its messages, else undo it; both only while
        the row still carries its note. Call with the chat's write lock held."""
        if await blob_matches(self._blobs, write.chat_id, write.sha256):
            changed = await self._db.finish_write(write.chat_id, write.note, write.updated_at)
            return FINISHED if changed else UNCHANGED
        return UNDONE if await self._undo_sql(write) else UNCHANGED

    @property
    def unresolved_count(self) -> int:
        return len(self._unresolved)

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


def messages_digest(messages_json: bytes) -> str:
    """SHA-256 of a messages array as stored: how a pending write knows its blob."""
    return hashlib.sha256(messages_json).hexdigest()


async def blob_matches(blobs: BlobStore, chat_id: str, digest: str) -> bool:
    """Whether the chat's blob holds the messages with this SHA-256 (a pending write's)."""
    stored = await blobs.get(chat_key(chat_id))
    return stored is not None and messages_digest(stored) == digest


def _note(op: str, messages_json: bytes, previous: ChatRow | None = None) -> tuple[str, str, float]:
    """The `pending` note a write leaves on its row until its blob is stored, with the
    digest and time it records."""
    digest, at = messages_digest(messages_json), time.time()
    intent: dict[str, Any] = {"op": op, "sha256": digest, "at": at}
    if previous is not None:
        intent["previous"] = dataclasses.asdict(previous)
    return orjson.dumps(intent).decode(), digest, at
