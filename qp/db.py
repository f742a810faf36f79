"""SQLite through aiosqlite: one writer connection, a pool of read-only readers, and all the SQL.

Every write is a function run inside `BEGIN IMMEDIATE` on the single writer connection; the
function *is* the transaction. Reads use their own connections (WAL mode), so a slow write
never blocks a read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

from qp.chat_model import ChatExists, ChatInput, ChatLimitExceeded, ChatRow
from qp.errors import StorageUnavailable
from qp.usage import CompletionRecord

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
READER_COUNT = 4
BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")
WriteFn = Callable[[aiosqlite.Connection], Awaitable[T]]


class Database:
    """The SQLite database: `write(fn)` for transactions, `reader()` for queries."""

    def __init__(self, writer: aiosqlite.Connection, readers: list[aiosqlite.Connection]):
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers = readers
        self._data_version: int | None = None
        for conn in readers:
            self._readers.put_nowait(conn)

    @classmethod
    async def open(cls, path: Path, reader_count: int = READER_COUNT) -> Database:
        """Open (creating if needed) the database, apply schema.sql, open the readers."""
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await writer.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before the client is told its chat is saved.
            await writer.execute("PRAGMA synchronous = FULL")
            await _apply_schema(writer)
            readers = []
            for _ in range(reader_count):
                reader = await aiosqlite.connect(
                    _read_only_uri(path), uri=True, isolation_level=None
                )
                await reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                readers.append(reader)
        except BaseException:
            await writer.close()
            raise
        return cls(writer, readers)

    async def close(self) -> None:
        for conn in self._all_readers:
            await conn.close()
        await self._writer.close()

    async def write(self, fn: WriteFn[T]) -> T:
        """Run `fn(conn)` as one transaction on the writer: committed if it returns, else undone."""
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                try:
                    result = await fn(self._writer)
                except BaseException:
                    await self._writer.execute("ROLLBACK")
                    raise
                await self._writer.execute("COMMIT")
                return result
            except sqlite3.Error as err:
                raise StorageUnavailable("Database", str(err)) from err

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        except sqlite3.Error as err:
            raise StorageUnavailable("Database", str(err)) from err
        finally:
            self._readers.put_nowait(conn)

    async def changed_elsewhere(self) -> bool:
        """True when another process committed to the database since the last call."""
        async with self._write_lock:
            # data_version on the writer moves only with other connections' commits.
            ((version,),) = await self._writer.execute_fetchall("PRAGMA data_version")
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    async def ping(self) -> None:
        async with self.reader() as conn:
            await conn.execute_fetchall("SELECT 1")

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
                "INSERT INTO chats (chat_id, app, model, prompt_tokens, completion_tokens,"
                " estimated_cost, created_at, updated_at, pending)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chat_id,
                    chat.app,
                    chat.model,
                    chat.prompt_tokens,
                    chat.completion_tokens,
                    chat.estimated_cost,
                    now,
                    now,
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
                    note,
                    chat_id,
                ),
            )
            return previous, note

        return await self.write(update)

    async def restore_chat(self, row: ChatRow) -> None:
        """Put a row back exactly as it was, with no write pending (undoing an update)."""

        async def restore(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                _UPDATE_CHAT,
                (
                    row.model,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.estimated_cost,
                    row.updated_at,
                    None,
                    row.chat_id,
                ),
            )

        await self.write(restore)

    async def settle_chats(self, writes: list[tuple[str, str]]) -> None:
        """Mark (chat id, pending) writes as done; a later write's `pending` is left alone."""
        if not writes:
            return

        async def settle(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ?", writes
            )

        await self.write(settle)

    async def pending_chats(self) -> list[tuple[ChatRow, str]]:
        """Rows whose last write may not have reached the blob store."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(
                _SELECT_CHAT.replace(" FROM chats", ", pending FROM chats")
                + " WHERE pending IS NOT NULL"
            )
        return [(ChatRow(*row[:-1]), row[-1]) for row in rows]

    async def import_chats(self, rows: list[ChatRow]) -> tuple[int, int, int]:
        """Store imported rows in one transaction: new ones added, stored ones replaced only
        by a newer one. Answers (added, replaced, unchanged)."""

        async def store(conn: aiosqlite.Connection) -> tuple[int, int, int]:
            added = replaced = 0
            for row in rows:
                found = await conn.execute_fetchall(
                    "SELECT updated_at FROM chats WHERE chat_id = ?", (row.chat_id,)
                )
                if found and found[0][0] >= row.updated_at:
                    continue
                await conn.execute(
                    "INSERT OR REPLACE INTO chats (chat_id, app, model, prompt_tokens,"
                    " completion_tokens, estimated_cost, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    dataclasses.astuple(row),
                )
                added, replaced = (added, replaced + 1) if found else (added + 1, replaced)
            return added, replaced, len(rows) - added - replaced

        return await self.write(store)

    async def all_chat_ids(self) -> list[tuple[str, str]]:
        """(chat id, updated_at) of every row."""
        async with self.reader() as conn:
            rows = await conn.execute_fetchall("SELECT chat_id, updated_at FROM chats")
        return [tuple(row) for row in rows]

    async def delete_chat(self, chat_id: str) -> None:
        async def delete(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM chats WHERE chat_id = ?", (chat_id,))

        await self.write(delete)

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
    " estimated_cost = ?, updated_at = ?, pending = ? WHERE chat_id = ?"
)


def _read_only_uri(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro"


_SELECT_CHAT = (
    "SELECT chat_id, app, model, prompt_tokens, completion_tokens, estimated_cost,"
    " created_at, updated_at FROM chats"
)

# Migrations, keyed by the version they start from: MIGRATIONS[n] takes a database from
# version n to n + 1 (e.g. `ALTER TABLE ...`). schema.sql, applied after them, is the whole
# current schema. Version 1 is the first; later issues append here.
MIGRATIONS: dict[int, str] = {
    1: "-- 1 -> 2 adds the completions table, which schema.sql creates",
    2: "-- 2 -> 3 adds the settings and blocks tables, which schema.sql creates",
    3: "ALTER TABLE chats ADD COLUMN pending TEXT;",
}


class SchemaTooNew(Exception):
    pass


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
    for version in range(current, target) if current else ():
        await conn.executescript(MIGRATIONS[version])
    await conn.executescript(schema)


def _schema_version(schema: str) -> int:
    for line in schema.splitlines():
        if line.strip().lower().startswith("pragma user_version"):
            return int(line.split("=")[1].strip(" ;"))
    raise ValueError("schema.sql does not set PRAGMA user_version")
