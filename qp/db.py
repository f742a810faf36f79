"""SQLite through aiosqlite: one writer connection, a pool of read-only readers, and all the SQL.

Every write is a function run inside `BEGIN IMMEDIATE` on the single writer connection; the
function *is* the transaction. Reads use their own connections (WAL mode), so a slow write
never blocks a read.

A database file deleted, replaced, truncated or overwritten under a running server goes on
taking SQLite's writes into a file no restart will find, so every commit is checked
against the file at the path before it counts, and a file found wrong refuses every write
after it until a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from qp.chat_model import ChatExists, ChatInput, ChatLimitExceeded, ChatRow
from qp.errors import FULL, READ_ONLY, UNAVAILABLE, StorageUnavailable
from qp.usage import CompletionRecord

log = logging.getLogger("qp.db")

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
READER_COUNT = 4
BUSY_TIMEOUT_MS = 5000
SQLITE_MAGIC = b"SQLite format 3\x00"

T = TypeVar("T")
WriteFn = Callable[[aiosqlite.Connection], Awaitable[T]]
# Called when a maintenance write (a delete, an undo, start-up) fails for lack of space:
# frees some room and answers whether it did, so the write is tried once more.
MakeRoom = Callable[[], bool]

# What a damaged file looks like to /healthz: the path is gone, holds another file, or the
# file's header or length changed under us.
DELETED = "deleted"
REPLACED = "replaced"
DAMAGED = "damaged"
# Its lock file was taken by another process: another server may be writing.
TAKEN_OVER = "taken-over"


def failure_reason(err: sqlite3.Error) -> str:
    """FULL, READ_ONLY or UNAVAILABLE for an error from SQLite."""
    code = getattr(err, "sqlite_errorcode", 0)
    if code & 0xFF == sqlite3.SQLITE_FULL or code == sqlite3.SQLITE_IOERR_SHMSIZE:
        return FULL
    if code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return READ_ONLY
    return UNAVAILABLE


def _is_corruption(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", 0) & 0xFF in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    )


async def connect(target: str, *, uri: bool = False) -> aiosqlite.Connection:
    """An aiosqlite connection whose sqlite3 connection was opened before its worker thread
    started: a file that cannot be opened fails here, with no thread left behind to report
    to an event loop that may be gone by then."""
    raw = await asyncio.to_thread(
        sqlite3.connect, target, uri=uri, isolation_level=None, check_same_thread=False
    )
    try:
        return await aiosqlite.Connection(lambda: raw, 64)
    except BaseException:
        raw.close()
        raise


class DatabaseFile:
    """Notices the database file being deleted, replaced, truncated or overwritten.

    Holds a read-only descriptor on the file it opened, for the life of the database:
    closing any descriptor of the file would drop SQLite's POSIX locks on it, so it is
    closed only after every connection.
    """

    def __init__(self, path: Path):
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self._fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self._fd)
        self._identity = (stat.st_dev, stat.st_ino)
        self._size = stat.st_size
        self._wal_identity = _identity(self.wal_path)

    def problem(self) -> str | None:
        """DELETED, REPLACED or DAMAGED, or None while the file is the one we opened, whole."""
        at_path = _identity(self.path)
        if at_path is None:
            return DELETED
        if at_path != self._identity:
            return REPLACED
        if self._wal_identity is not None and _identity(self.wal_path) != self._wal_identity:
            return DAMAGED  # the write-ahead log holding the latest commits was removed
        try:
            size = os.fstat(self._fd).st_size
            header = os.pread(self._fd, len(SQLITE_MAGIC), 0)
        except OSError:
            return DAMAGED
        # SQLite never shrinks the file here (no VACUUM, no auto-vacuum).
        if size < self._size or header != SQLITE_MAGIC:
            return DAMAGED
        self._size = size
        return None

    def close(self) -> None:
        os.close(self._fd)


def _every_commit_in_main_file(path: Path) -> bool:
    """True when the database exists with no write-ahead log holding commits beside it."""
    wal = path.with_name(path.name + "-wal")
    return path.exists() and (not wal.exists() or wal.stat().st_size == 0)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class Database:
    """The SQLite database: `write(fn)` for transactions, `reader()` for queries."""

    def __init__(
        self,
        writer: aiosqlite.Connection | None,
        readers: list[aiosqlite.Connection],
        file: DatabaseFile,
        make_room: MakeRoom | None = None,
    ):
        # None: opened read-only because the disk was full (see `open`).
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers = readers
        self._file = file
        self._make_room = make_room
        self._data_version: int | None = None
        # Set once the file is found deleted, replaced or damaged: writes refused until restart.
        self.damage: str | None = None
        for conn in readers:
            self._readers.put_nowait(conn)

    @classmethod
    async def open(
        cls, path: Path, reader_count: int = READER_COUNT, make_room: MakeRoom | None = None
    ) -> Database:
        """Open (creating if needed) the database, bring its schema up to date, open the
        readers.

        On a full disk, `make_room` is asked for room once; failing that, a database whose
        every commit is in its main file (no write-ahead log left) opens read-only: reads
        are served, writes refused (FULL) until a restart with room.
        """
        try:
            return await cls._open(path, reader_count, make_room)
        except sqlite3.Error as err:
            if failure_reason(err) != FULL:
                raise
            full = err
        if make_room is not None and make_room():
            try:
                return await cls._open(path, reader_count, make_room)
            except sqlite3.Error as err:
                if failure_reason(err) != FULL:
                    raise
        if not _every_commit_in_main_file(path):
            raise full
        log.error("the disk is full: the database is open read-only; restart with room to write")
        readers = []
        async with AsyncExitStack() as opened:
            for _ in range(reader_count):
                reader = await connect(f"{_read_only_uri(path)}&immutable=1", uri=True)
                opened.push_async_callback(reader.close)
                readers.append(reader)
            file = DatabaseFile(path)
            opened.pop_all()
        return cls(None, readers, file, make_room)

    @classmethod
    async def _open(cls, path: Path, reader_count: int, make_room: MakeRoom | None) -> Database:
        path.parent.mkdir(parents=True, exist_ok=True)
        async with AsyncExitStack() as opened:
            writer = await connect(str(path))
            opened.push_async_callback(writer.close)
            await writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # No memory-mapped I/O: a file truncated under a mapping kills the process (SIGBUS).
            await writer.execute("PRAGMA mmap_size = 0")
            ((mode,),) = await writer.execute_fetchall("PRAGMA journal_mode")
            if mode != "wal":
                await writer.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before the client is told its chat is saved.
            await writer.execute("PRAGMA synchronous = FULL")
            await _apply_schema(writer)
            readers = []
            for _ in range(reader_count):
                reader = await connect(_read_only_uri(path), uri=True)
                opened.push_async_callback(reader.close)
                await reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                await reader.execute("PRAGMA mmap_size = 0")
                readers.append(reader)
            file = DatabaseFile(path)
            opened.pop_all()
        return cls(writer, readers, file, make_room)

    async def close(self) -> None:
        try:
            for conn in self._all_readers:
                await conn.close()
            if self._writer is not None:
                await self._writer.close()
        finally:
            self._file.close()

    async def write(self, fn: WriteFn[T], *, maintenance: bool = False) -> T:
        """Run `fn(conn)` as one transaction on the writer: committed if it returns, else undone.

        A `maintenance` write (a delete, an undo) that fails for lack of space is tried once
        more after the reserve's room is given back; client writes never take that room.
        """
        async with self._write_lock:
            self._refuse_if_damaged()
            if self._writer is None:
                raise StorageUnavailable(
                    "Database", "opened read-only: the disk was full at start-up", FULL
                )
            try:
                try:
                    result = await self._transaction(fn)
                except sqlite3.Error as err:
                    if not (maintenance and failure_reason(err) == FULL and self._room()):
                        raise
                    result = await self._transaction(fn)
            except sqlite3.Error as err:
                self._note_corruption(err)
                raise StorageUnavailable("Database", str(err), failure_reason(err)) from err
            # Only now does the commit count: it must be in the file a restart opens.
            self.verify_file()
            return result

    async def _transaction(self, fn: WriteFn[T]) -> T:
        writer = self._writer
        assert writer is not None
        await writer.execute("BEGIN IMMEDIATE")
        try:
            result = await fn(writer)
            await writer.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does that to a commit).
            if writer.in_transaction:
                with suppress(sqlite3.Error):
                    await writer.execute("ROLLBACK")
            raise
        return result

    def _room(self) -> bool:
        return self._make_room is not None and self._make_room()

    def check_file(self) -> str | None:
        """DELETED, REPLACED or DAMAGED once the file at the path is found not to be the
        database this process opened, whole (writes are refused from then on); else None."""
        if self.damage is None:
            problem = self._file.problem()
            if problem is not None:
                self._damaged(problem)
        return self.damage

    def verify_file(self) -> None:
        """StorageUnavailable unless the file at the path is still this database, whole."""
        self.check_file()
        self._refuse_if_damaged()

    def refuse_writes(self, why: str) -> None:
        """From now on every write is refused: another process took the database over."""
        if self.damage is None:
            self.damage = TAKEN_OVER
            log.error("%s: writes are refused until the server is restarted", why)

    def _refuse_if_damaged(self) -> None:
        if self.damage is not None:
            raise StorageUnavailable(
                "Database", f"the database file was {self.damage}; writes wait for a restart"
            )

    def _damaged(self, problem: str) -> None:
        if self.damage is None:
            self.damage = problem
            log.error(
                "the database file %s was %s while the server ran: writes are refused"
                " until it is restored and the server restarted",
                self._file.path,
                problem,
            )

    def _note_corruption(self, err: sqlite3.Error) -> None:
        if _is_corruption(err):
            self._damaged(DAMAGED)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        except sqlite3.Error as err:
            self._note_corruption(err)
            raise StorageUnavailable("Database", str(err), failure_reason(err)) from err
        finally:
            self._readers.put_nowait(conn)

    async def changed_elsewhere(self) -> bool:
        """True when another process committed to the database since the last call."""
        if self._writer is None:
            return False
        async with self._write_lock:
            # data_version on the writer moves only with other connections' commits.
            try:
                ((version,),) = await self._writer.execute_fetchall("PRAGMA data_version")
            except sqlite3.Error as err:
                raise StorageUnavailable("Database", str(err), failure_reason(err)) from err
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    async def ping(self) -> None:
        async with self.reader() as conn:
            await conn.execute_fetchall("SELECT 1")

    async def probe_write(self) -> None:
        """One small real commit: does the database take writes (again)?"""

        async def probe(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT OR REPLACE INTO settings (name, value) VALUES ('write_probe', ?)",
                (str(os.getpid()),),
            )

        await self.write(probe)

    # --- chats -------------------------------------------------------------------------

    async def chat_row(self, chat_id: str) -> ChatRow | None:
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(_SELECT_CHAT + " WHERE chat_id = ?", (chat_id,))
        return ChatRow(*rows[0]) if rows else None

    async def recent_chat_rows(self, app: str, limit: int) -> list[ChatRow]:
        """The app's chats, newest `updated_at` first."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                _SELECT_CHAT + " WHERE app = ? ORDER BY updated_at DESC LIMIT ?", (app, limit)
            )
        return [ChatRow(*row) for row in rows]

    async def chat_rows_by_id(self, chat_ids: list[str]) -> list[ChatRow]:
        async with self.reader() as conn:
            marks = ",".join("?" * len(chat_ids))
            rows = await conn.execute_fetchall(
                _SELECT_CHAT + f" WHERE chat_id IN ({marks}) ORDER BY updated_at DESC", chat_ids
            )
        return [ChatRow(*row) for row in rows]

    # A chat write changes the row (with `pending` describing the write) before the blob,
    # and clears `pending` after it. After a crash, a row with `pending` set tells exactly
    # which writes may be half done, and how to finish or undo each (ChatStore.recover).

    async def insert_chat(
        self, chat_id: str, chat: ChatInput, now: str, max_chats_per_app: int, pending: str
    ) -> None:
        """Insert a new row; the app's count check and the insert are one transaction."""

        async def insert(conn: aiosqlite.Connection) -> None:
            (count,) = (
                await conn.execute_fetchall("SELECT COUNT(*) FROM chats WHERE app = ?", (chat.app,))
            )[0]
            if count >= max_chats_per_app:
                raise ChatLimitExceeded
            if await conn.execute_fetchall("SELECT 1 FROM chats WHERE chat_id = ?", (chat_id,)):
                raise ChatExists
            await conn.execute(
                f"INSERT INTO chats ({_CHAT_COLUMNS}, pending)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chat_id,
                    chat.app,
                    chat.model,
                    chat.prompt_tokens,
                    chat.completion_tokens,
                    chat.estimated_cost,
                    now,
                    now,
                    len(chat.messages_json),
                    pending,
                ),
            )

        await self.write(insert)

    async def update_chat(
        self, chat_id: str, chat: ChatInput, now: str, pending: Callable[[ChatRow], str]
    ) -> tuple[ChatRow, str] | None:
        """Replace model, usage and updated_at, recording `pending(row as it was)`; returns
        the row as it was and the pending note written, or None if absent."""

        async def update(conn: aiosqlite.Connection) -> tuple[ChatRow, str] | None:
            rows = await conn.execute_fetchall(_SELECT_CHAT + " WHERE chat_id = ?", (chat_id,))
            if not rows:
                return None
            previous = ChatRow(*rows[0])
            note = pending(previous)
            await conn.execute(
                _UPDATE_CHAT,
                (
                    chat.model,
                    chat.prompt_tokens,
                    chat.completion_tokens,
                    chat.estimated_cost,
                    now,
                    len(chat.messages_json),
                    note,
                    chat_id,
                ),
            )
            return previous, note

        return await self.write(update)

    # Finishing or undoing a write is conditional on the row still carrying that write's
    # `pending` note and `updated_at`: whoever resolves a write (the writer itself after a
    # failed blob, a start-up, `check --repair` beside a live server) can never clobber a
    # write that came after it. Each answers whether it changed the row.

    async def finish_write(self, chat_id: str, pending: str, updated_at: str) -> bool:
        """The write's blob is stored: clear its note."""
        return await self._change_if_pending(
            "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ? AND updated_at = ?",
            (chat_id, pending, updated_at),
        )

    async def undo_create(self, chat_id: str, pending: str, updated_at: str) -> bool:
        """A create whose blob was not stored: remove its row."""
        return await self._change_if_pending(
            "DELETE FROM chats WHERE chat_id = ? AND pending = ? AND updated_at = ?",
            (chat_id, pending, updated_at),
        )

    async def undo_update(self, previous: ChatRow, pending: str, updated_at: str) -> bool:
        """An update whose blob was not stored: put the row back exactly as it was."""
        return await self._change_if_pending(
            _UPDATE_CHAT + " AND pending = ? AND updated_at = ?",
            (
                previous.model,
                previous.prompt_tokens,
                previous.completion_tokens,
                previous.estimated_cost,
                previous.updated_at,
                previous.messages_bytes,
                None,
                previous.chat_id,
                pending,
                updated_at,
            ),
        )

    async def _change_if_pending(self, statement: str, params: tuple[Any, ...]) -> bool:
        async def change(conn: aiosqlite.Connection) -> bool:
            cursor = await conn.execute(statement, params)
            return cursor.rowcount > 0

        return await self.write(change, maintenance=True)

    async def settle_chats(self, writes: list[tuple[str, str]]) -> None:
        """Mark (chat id, pending) writes as done; a later write's `pending` is left alone."""
        if not writes:
            return

        async def settle(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ?", writes
            )

        await self.write(settle, maintenance=True)

    async def pending_chats(self) -> list[tuple[ChatRow, str]]:
        """Rows whose last write may not have reached the blob store, with its note."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                f"SELECT {_CHAT_COLUMNS}, pending FROM chats WHERE pending IS NOT NULL"
            )
        return [(ChatRow(*row[:-1]), row[-1]) for row in rows]

    async def delete_settled_chat(
        self, chat_id: str, updated_at: str, and_then: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Delete a row no write is pending on and unchanged since it was read (same
        `updated_at`), with `and_then` (checking and deleting its blob) run inside the same
        transaction, which commits only if it answers True. No write of that chat, from any
        process, can start until both are done."""

        async def delete(conn: aiosqlite.Connection) -> bool:
            cursor = await conn.execute(
                "DELETE FROM chats WHERE chat_id = ? AND pending IS NULL AND updated_at = ?",
                (chat_id, updated_at),
            )
            if cursor.rowcount == 0 or not await and_then():
                raise _Unchanged
            return True

        try:
            return await self.write(delete, maintenance=True)
        except _Unchanged:
            return False

    async def without_row(self, chat_id: str, and_then: Callable[[], Awaitable[bool]]) -> bool:
        """Run `and_then` (deleting an orphan blob) only while the chat has no row, inside a
        write transaction: no create, from any process, can insert its row meanwhile."""

        async def check(conn: aiosqlite.Connection) -> bool:
            if await conn.execute_fetchall("SELECT 1 FROM chats WHERE chat_id = ?", (chat_id,)):
                return False
            return await and_then()

        return await self.write(check, maintenance=True)

    async def import_chats(self, rows: list[ChatRow]) -> tuple[int, int, int]:
        """Store imported rows in one transaction: new ones added, stored ones replaced only
        by a newer one. Answers (added, replaced, unchanged)."""

        async def store(conn: aiosqlite.Connection) -> tuple[int, int, int]:
            added = replaced = 0
            for row in rows:
                found = await conn.execute_fetchall(
                    "SELECT updated_at, pending FROM chats WHERE chat_id = ?", (row.chat_id,)
                )
                # A row a server is writing right now (pending) is the server's to finish.
                if found and (found[0][0] >= row.updated_at or found[0][1] is not None):
                    continue
                await conn.execute(
                    f"INSERT OR REPLACE INTO chats ({_CHAT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    dataclasses.astuple(row),
                )
                added, replaced = (added, replaced + 1) if found else (added + 1, replaced)
            return added, replaced, len(rows) - added - replaced

        return await self.write(store)

    async def stored_bytes(self) -> tuple[int, int]:
        """Bytes of messages the rows say are stored, and how many rows do not say."""
        async with self.reader() as conn:
            ((total, unknown),) = await conn.execute_fetchall(
                "SELECT COALESCE(SUM(messages_bytes), 0), COUNT(*) - COUNT(messages_bytes)"
                " FROM chats"
            )
        return total, unknown

    async def chats_of_unknown_size(self, limit: int) -> list[str]:
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                "SELECT chat_id FROM chats WHERE messages_bytes IS NULL LIMIT ?", (limit,)
            )
        return [row[0] for row in rows]

    async def note_sizes(self, sizes: list[tuple[int, str]]) -> None:
        """Record (size, chat id) of messages found in the blob store (rows imported)."""

        async def note(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "UPDATE chats SET messages_bytes = ? WHERE chat_id = ? AND messages_bytes IS NULL",
                sizes,
            )

        await self.write(note)

    async def all_chat_ids(self) -> list[tuple[str, str]]:
        """(chat id, updated_at) of every row."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall("SELECT chat_id, updated_at FROM chats")
        return [tuple(row) for row in rows]

    async def delete_chat(self, chat_id: str) -> int:
        """Remove the row; answers the size of the messages it said were stored."""

        async def delete(conn: aiosqlite.Connection) -> int:
            rows = await conn.execute_fetchall(
                "DELETE FROM chats WHERE chat_id = ? RETURNING messages_bytes", (chat_id,)
            )
            return (rows[0][0] or 0) if rows else 0

        # Deletes are how an operator makes room on a full disk: they may use the reserve.
        return await self.write(delete, maintenance=True)

    # --- the spend ledger ----------------------------------------------------------------

    async def insert_completions(self, records: list[CompletionRecord]) -> None:
        async def insert(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "INSERT INTO completions (started_at, app, model, payer, prompt_tokens,"
                " completion_tokens, cost, status, outcome, duration_ms, client_left)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        record.started_at,
                        record.app,
                        record.model,
                        record.payer,
                        record.prompt_tokens,
                        record.completion_tokens,
                        record.cost,
                        record.status,
                        record.outcome,
                        record.duration_ms,
                        int(record.client_left),
                    )
                    for record in records
                ],
            )

        await self.write(insert)

    async def usage_totals(self, since: str | None, app: str | None) -> list[UsageTotal]:
        """Completions, tokens and cost by app, model and payer."""
        where, params = [], []
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        if app is not None:
            where.append("app = ?")
            params.append(app)
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                "SELECT app, model, payer, COUNT(*), COALESCE(SUM(prompt_tokens), 0),"
                " COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost), 0),"
                " SUM(client_left) FROM completions"
                + (" WHERE " + " AND ".join(where) if where else "")
                + " GROUP BY app, model, payer ORDER BY app, model, payer",
                params,
            )
        return [UsageTotal(*row) for row in rows]

    # --- installation settings and blocks -------------------------------------------------

    async def installation_salt(self) -> str:
        """The random salt for client-address hashes, made on first use and kept."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall("SELECT value FROM settings WHERE name = 'ip_salt'")
        if rows:
            return rows[0][0]  # read without a write: a restart on a full disk needs no room

        async def get_or_make(conn: aiosqlite.Connection) -> str:
            await conn.execute(
                "INSERT OR IGNORE INTO settings (name, value) VALUES ('ip_salt', ?)",
                (secrets.token_hex(32),),
            )
            rows = await conn.execute_fetchall("SELECT value FROM settings WHERE name = 'ip_salt'")
            return rows[0][0]

        return await self.write(get_or_make)

    async def active_blocks(self, now: str) -> list[tuple[str, str]]:
        """(client hash, blocked until) of the blocks not yet over."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                "SELECT client_hash, blocked_until FROM blocks WHERE blocked_until > ?"
                " ORDER BY blocked_until",
                (now,),
            )
        return [tuple(row) for row in rows]

    async def save_block(self, client_hash: str, blocked_at: str, blocked_until: str) -> None:
        async def save(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT OR REPLACE INTO blocks (client_hash, blocked_at, blocked_until)"
                " VALUES (?, ?, ?)",
                (client_hash, blocked_at, blocked_until),
            )

        await self.write(save)

    async def delete_block(self, client_hash: str) -> bool:
        async def delete(conn: aiosqlite.Connection) -> bool:
            cursor = await conn.execute("DELETE FROM blocks WHERE client_hash = ?", (client_hash,))
            return cursor.rowcount > 0

        return await self.write(delete)


@dataclass(frozen=True, slots=True)
class UsageTotal:
    app: str | None
    model: str
    payer: str
    completions: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    client_left: int


_UPDATE_CHAT = (
    "UPDATE chats SET model = ?, prompt_tokens = ?, completion_tokens = ?,"
    " estimated_cost = ?, updated_at = ?, messages_bytes = ?, pending = ? WHERE chat_id = ?"
)


def _read_only_uri(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro"


_CHAT_COLUMNS = (
    "chat_id, app, model, prompt_tokens, completion_tokens, estimated_cost, created_at,"
    " updated_at, messages_bytes"
)
_SELECT_CHAT = f"SELECT {_CHAT_COLUMNS} FROM chats"

# Migrations, keyed by the version they start from: MIGRATIONS[n] takes a database from
# version n to n + 1 (e.g. `ALTER TABLE ...`). schema.sql, applied after them, is the whole
# current schema. Version 1 is the first; later issues append here.
MIGRATIONS: dict[int, str] = {
    1: "-- 1 -> 2 adds the completions table, which schema.sql creates",
    2: "-- 2 -> 3 adds the settings and blocks tables, which schema.sql creates",
    3: "ALTER TABLE chats ADD COLUMN pending TEXT;",
    4: "ALTER TABLE chats ADD COLUMN messages_bytes INTEGER;",
}


class SchemaTooNew(Exception):
    pass


class _Unchanged(Exception):
    """Rolls back a conditional change whose condition no longer holds."""


async def _apply_schema(conn: aiosqlite.Connection) -> None:
    schema = SCHEMA_PATH.read_text(encoding="utf-8")
    target = _schema_version(schema)
    ((current,),) = await conn.execute_fetchall("PRAGMA user_version")
    if current == 0 and await conn.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chats'"
    ):
        current = 1  # the worker's own D1 table, loaded into SQLite: version 1's chats
    if current > target:
        raise SchemaTooNew(f"schema version {current} is newer than this server's ({target})")
    if current == target:
        return  # nothing to write: a start on a full or read-only disk needs no room
    for version in range(current, target) if current else ():
        await conn.executescript(MIGRATIONS[version])
    await conn.executescript(schema)


def _schema_version(schema: str) -> int:
    for line in schema.splitlines():
        if line.strip().lower().startswith("pragma user_version"):
            return int(line.split("=")[1].strip(" ;"))
    raise ValueError("schema.sql does not set PRAGMA user_version")
