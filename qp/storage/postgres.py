"""PostgreSQL through asyncpg (QP_DATABASE=postgresql://...): a pool of connections, each
write a transaction on one of them. Plumbing only, like qp/storage/sqlite.py: the features
keep their SQL, written with `?` and `:name` placeholders, which are turned into asyncpg's
`$n` here (once per statement, cached).

For now one process owns a database, as with SQLite: a session advisory lock, held for the
process's life, refuses a second server on the same database. The operators' tools (which
do not take it) notify a channel with each write; the server listens on its lock's
connection and learns of them as `changed_elsewhere()`.

Numbers: the chats' token counts are NUMERIC, read back as an int when whole and a float
otherwise, so a client's 12 or 12.5 comes back as it went in (as SQLite's INTEGER affinity
does); costs are double precision (SQLite's REAL).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from qp.config import mask_url
from qp.errors import FULL, READ_ONLY, UNAVAILABLE, StorageUnavailable
from qp.storage.database import Parameters, StatementHelpers, WriteFn
from qp.storage.postgres_schema import migrate

log = logging.getLogger("qp.storage.postgres")

T = TypeVar("T")
POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0
STATEMENT_TIMEOUT = 30.0
# pg_try_advisory_lock key held by the process that serves the database ("qp-own").
OWNER_LOCK = 0x71702D6F776E
# The operators' tools notify this channel with each write; the server listens, and drops
# its cached chats and reloads its blocks (as SQLite's data_version tells it there).
CHANGES = "qp_changes"
UNOWNED = "unowned"
_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?|(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


class DatabaseOwned(Exception):
    """Another process serves this database."""


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str, tuple[str, ...]]:
    """The statement with `$n` placeholders, and the names of its named parameters in
    order (none when it is positional). Text in quotes is left alone."""
    names: list[str] = []
    positional = 0

    def placeholder(match: re.Match[str]) -> str:
        nonlocal positional
        text = match.group(0)
        if text.startswith("'"):
            return text
        if text == "?":
            positional += 1
            return f"${positional}"
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(placeholder, sql), tuple(names)


def _statement(sql: str, params: Parameters) -> tuple[str, list[Any]]:
    text, names = translate(sql)
    if isinstance(params, Mapping):
        return text, [params[name] for name in names]
    return text, list(params)


def _changed(status: str) -> int:
    """The rows a command changed, from its status: `UPDATE 3`, `INSERT 0 1`, `DELETE 2`."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _numeric_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _numeric_value(text: str) -> int | float:
    number = Decimal(text)
    return int(number) if number == number.to_integral_value() else float(number)


async def _set_up(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "numeric",
        encoder=_numeric_text,
        decoder=_numeric_value,
        schema="pg_catalog",
        format="text",
    )


def failure_reason(err: BaseException) -> str:
    """FULL, READ_ONLY or UNAVAILABLE for an error from PostgreSQL or the way to it."""
    if isinstance(err, asyncpg.DiskFullError | asyncpg.OutOfMemoryError):
        return FULL
    if isinstance(err, asyncpg.ReadOnlySQLTransactionError):
        return READ_ONLY
    return UNAVAILABLE


# What a database failure looks like from asyncpg: the server's errors, a connection that
# broke or timed out, a pool closing.
FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresTransaction:
    """A write's statements on its connection (see qp.storage.database)."""

    def __init__(self, conn: asyncpg.Connection):
        self._conn = conn

    async def execute(self, sql: str, params: Parameters = ()) -> int:
        text, args = _statement(sql, params)
        return _changed(await self._conn.execute(text, *args))

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        text, _ = translate(sql)
        await self._conn.executemany(text, [list(row) for row in params])

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        text, args = _statement(sql, params)
        return [tuple(row) for row in await self._conn.fetch(text, *args)]

    async def lock(self, key: str) -> None:
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)


class PostgresDatabase(StatementHelpers):
    """The PostgreSQL database: `write(fn)` for transactions, the pool for queries."""

    def __init__(self, pool: asyncpg.Pool, owner: asyncpg.Connection, url: str, *, serving: bool):
        self._pool = pool
        self._owner = owner
        self.url = url
        self.damage: str | None = None
        # A server listens for the tools' writes; a tool announces its own.
        self._serving = serving
        self._changed = False

    @classmethod
    async def open(
        cls, url: str, pool_size: int = POOL_SIZE, *, claim: bool = True
    ) -> PostgresDatabase:
        """Connect, claim the database for this process (DatabaseOwned if another has it;
        the operators' tools do not claim it), bring its schema up to date, open the pool."""
        owner = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        pool = None
        try:
            if claim and not await owner.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK):
                holder = await owner.fetchval(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
                    " AND granted LIMIT 1",
                    OWNER_LOCK & 0xFFFFFFFF,
                )
                raise DatabaseOwned(f"another qp-server holds it (backend pid {holder})")
            await migrate(owner)
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                init=_set_up,
                timeout=CONNECT_TIMEOUT,
                command_timeout=STATEMENT_TIMEOUT,
            )
            database = cls(pool, owner, url, serving=claim)
            if claim:
                await owner.add_listener(CHANGES, database._note_change)
        except BaseException:
            if pool is not None:
                pool.terminate()
            await owner.close()
            raise
        return database

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()
        finally:
            await self._owner.close()

    async def write(self, fn: WriteFn[T], *, maintenance: bool = False) -> T:
        """Run `fn(transaction)` as one transaction: committed if it returns, else undone."""
        self._refuse_if_damaged()
        try:
            async with (
                self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn,
                conn.transaction(),
            ):
                result = await fn(PostgresTransaction(conn))
                if not self._serving:  # delivered when the transaction commits
                    await conn.execute("SELECT pg_notify($1, '')", CHANGES)
                return result
        except FAILURES as err:
            raise StorageUnavailable("Database", _describe(err), failure_reason(err)) from err

    def _refuse_if_damaged(self) -> None:
        self.check_file()  # the ownership lock may have gone with its session just now
        if self.damage is not None:
            raise StorageUnavailable("Database", f"writes refused: {self.damage}")

    def check_file(self) -> str | None:
        """With the session that holds the ownership lock gone (PostgreSQL restarted or
        ended it), the lock is gone too and another server may take the database: every
        write is refused until `reclaim` takes the lock again."""
        if self.damage is None and self._serving and self._owner.is_closed():
            self.damage = UNOWNED
            log.error(
                "the connection holding %s for this server was lost: writes are refused"
                " until it is claimed again",
                self.shown,
            )
        return self.damage

    async def reclaim(self) -> None:
        """Housekeeping, every second: with the ownership lock lost, connect again and take
        it; if another server has it meanwhile, this one never writes again (taken over)."""
        if self.check_file() != UNOWNED:
            return
        try:
            owner = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
        except FAILURES:
            return  # PostgreSQL is still away: the next round tries again
        try:
            claimed = await owner.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK)
            if claimed:
                await owner.add_listener(CHANGES, self._note_change)
        except BaseException:
            await owner.close()
            raise
        if not claimed:
            await owner.close()
            self.damage = "taken-over"
            log.error("another qp-server took %s meanwhile: writes are refused", self.shown)
            return
        old, self._owner = self._owner, owner
        await old.close()
        self.damage = None
        self._changed = True  # what happened meanwhile is unknown: forget what is cached
        log.warning("claimed %s again: writes are taken again", self.shown)

    def refuse_writes(self, why: str) -> None:
        if self.damage is None:
            self.damage = "taken-over"
            log.error("%s: writes are refused until the server is restarted", why)

    async def changed_elsewhere(self) -> bool:
        """True when an operators' tool wrote to the database since the last call."""
        changed, self._changed = self._changed, False
        return changed

    def _note_change(self, conn: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        self._changed = True

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return await PostgresTransaction(conn).fetchall(sql, params)
        except FAILURES as err:
            raise StorageUnavailable("Database", _describe(err), failure_reason(err)) from err

    async def probe_write(self) -> None:
        await self.execute_write(
            "INSERT INTO settings (name, value) VALUES ('write_probe', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(os.getpid()),),
        )

    @property
    def shown(self) -> str:
        return mask_url(self.url)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
