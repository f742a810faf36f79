"""PostgreSQL through asyncpg (QP_DATABASE=postgresql://...): a pool of connections, each
write a transaction on one of them. Plumbing only, like qp/storage/sqlite.py: the features
keep their SQL, written with `?` and `:name` placeholders, which are turned into asyncpg's
`$n` here (once per statement, cached).

Connections: a pool for requests (QP_DATABASE_POOL, 20), a quick pool for the writes whose
commits need not wait for the disk (QP_DATABASE_QUICK_POOL, 5), and for a server one
connection kept for its process lease, so that requests waiting for a connection never
delay a renewal, and one that listens (below): up to 27 a process by default.

Several server processes may share one database. Each server keeps one more connection
that LISTENs on a channel: the features announce what they change there (`chat:ID`,
`blocks`) and the operators' tools announce every write (an empty topic: anything may have
changed), passed on to qp/storage/peers.py's SharedPeers. While that connection is lost,
nothing another process changes is heard: `listening` is False (caches are not kept)
until housekeeping connects again.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from qp.errors import FULL, READ_ONLY, UNAVAILABLE, StorageUnavailable, UnstorableValue
from qp.masking import mask_url
from qp.storage.database import (
    TAKEN_OVER,
    Parameters,
    StatementHelpers,
    WriteFn,
)
from qp.storage.migrations import PostgresSchema, migrate

log = logging.getLogger("qp.storage.postgres")

T = TypeVar("T")
POOL_SIZE = 20
QUICK_POOL_SIZE = 5
QUICK_SETTINGS = {"synchronous_commit": "off"}
CONNECT_TIMEOUT = 10.0
STATEMENT_TIMEOUT = 30.0
TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
# The channel every change is announced on (its payload the topic; see the docstring).
CHANGES = "qp_changes"
_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?|(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


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


def postgres_failure_reason(err: BaseException) -> str:
    """FULL, READ_ONLY or UNAVAILABLE for an error from PostgreSQL or the way to it."""
    if isinstance(err, asyncpg.DiskFullError | asyncpg.OutOfMemoryError):
        return FULL
    if isinstance(err, asyncpg.ReadOnlySQLTransactionError):
        return READ_ONLY
    return UNAVAILABLE


# What a database failure looks like from asyncpg: the server's errors, a connection that
# broke or timed out, a pool closing.
FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# A value the database cannot take, not a failure: class 22 (a NUL, text that is not
# UTF-8, a number out of range; asyncpg reports arguments it cannot encode the same way)
# and class 23 (a constraint the row breaks).
DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


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

    async def notify(self, topic: str) -> None:
        await self._conn.execute("SELECT pg_notify($1, $2)", CHANGES, topic)


async def _transaction(conn: asyncpg.Connection, fn: WriteFn[T], announce: bool) -> T:
    async with conn.transaction():
        result = await fn(PostgresTransaction(conn))
        if announce:  # delivered when the transaction commits
            await conn.execute("SELECT pg_notify($1, '')", CHANGES)
        return result


class PostgresDatabase(StatementHelpers):
    """The PostgreSQL database: `write(fn)` for transactions, the pool for queries."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        quick_pool: asyncpg.Pool,
        reserved_pool: asyncpg.Pool | None,
        listener: asyncpg.Connection | None,
        url: str,
        *,
        serving: bool,
    ):
        self._pool = pool
        # For writes a database crash may forget (rate counts, budget reservations): their
        # commits do not wait for the disk, so their rows' locks are held a moment only.
        self._quick_pool = quick_pool
        # One connection of a server's own for its process lease (tools hold no lease).
        self._reserved_pool = reserved_pool or pool
        self._listener = listener
        self.url = url
        self.damage: str | None = None
        # A server listens for the others' changes; a tool announces each of its writes.
        self._serving = serving
        self._told: Callable[[str], None] = _nobody

    @classmethod
    async def open(
        cls,
        url: str,
        pool_size: int = POOL_SIZE,
        quick_pool_size: int = QUICK_POOL_SIZE,
        *,
        serving: bool = True,
    ) -> PostgresDatabase:
        """Connect, bring the schema up to date, open the pools; a server (`serving`) also
        keeps a connection for its lease and listens for the changes others announce."""
        first = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        pools: list[asyncpg.Pool] = []
        sizes = [(pool_size, {}), (quick_pool_size, QUICK_SETTINGS)]
        try:
            await migrate(PostgresSchema(first))
            for size, settings in sizes + ([(1, {})] if serving else []):
                pools.append(
                    await asyncpg.create_pool(
                        url,
                        min_size=1,
                        max_size=size,
                        init=_set_up,
                        timeout=CONNECT_TIMEOUT,
                        command_timeout=STATEMENT_TIMEOUT,
                        server_settings=settings,
                    )
                )
            reserved = pools[2] if serving else None
            database = cls(pools[0], pools[1], reserved, None, url, serving=serving)
            if serving:
                await database._listen(first)
            else:
                await first.close()
        except BaseException:
            for pool in pools:
                pool.terminate()
            await first.close()
            raise
        return database

    async def _listen(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener(CHANGES, self._heard)
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn

    async def close(self) -> None:
        try:
            for pool in dict.fromkeys((self._pool, self._quick_pool, self._reserved_pool)):
                try:
                    await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
                except TimeoutError:
                    pool.terminate()
        finally:
            if self._listener is not None:
                listener, self._listener = self._listener, None
                await listener.close()

    async def write(
        self,
        fn: WriteFn[T],
        *,
        maintenance: bool = False,
        durable: bool = True,
        reserved: bool = False,
    ) -> T:
        """Run `fn(transaction)` as one transaction: committed if it returns, else undone
        (on a connection whose commits do not wait for the disk, unless `durable`; on the
        process lease's own, if `reserved`)."""
        self._refuse_if_damaged()
        pool = self._reserved_pool if reserved else self._pool if durable else self._quick_pool
        with unavailable_on_failure():
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return await _transaction(conn, fn, not self._serving)

    async def execute_write(
        self, sql: str, params: Parameters = (), *, maintenance: bool = False, durable: bool = True
    ) -> int:
        """One statement, committed on its own (no BEGIN and COMMIT round trips; on a
        connection whose commits do not wait for the disk, unless `durable`)."""
        if not self._serving:
            return await super().execute_write(
                sql, params, maintenance=maintenance, durable=durable
            )
        self._refuse_if_damaged()
        text, args = _statement(sql, params)
        pool = self._pool if durable else self._quick_pool
        with unavailable_on_failure():
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return _changed(await conn.execute(text, *args))

    async def execute_write_returning(
        self, sql: str, params: Parameters = (), *, durable: bool = True
    ) -> list[tuple[Any, ...]]:
        """One statement with RETURNING, committed on its own (on a connection whose commits
        do not wait for the disk, unless `durable`)."""
        if not self._serving:
            return await super().execute_write_returning(sql, params)
        self._refuse_if_damaged()
        pool = self._pool if durable else self._quick_pool
        with unavailable_on_failure():
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return await PostgresTransaction(conn).fetchall(sql, params)

    def _refuse_if_damaged(self) -> None:
        if self.damage is not None:
            raise StorageUnavailable("Database", f"writes refused: {self.damage}")

    def check_file(self) -> str | None:
        """No file to check: PostgreSQL keeps its own."""
        return self.damage

    def on_change(self, told: Callable[[str], None]) -> None:
        """Tell `told` the topic of each change another process announces, and an empty
        topic when anything may have changed unheard (the listening connection lost, or
        listening again)."""
        self._told = told

    @property
    def listening(self) -> bool:
        """True while every announced change is heard (a tool, which listens to nothing
        and caches nothing, too)."""
        return not self._serving or (self._listener is not None and not self._listener.is_closed())

    def _listener_lost(self, conn: asyncpg.Connection) -> None:
        if conn is self._listener:
            log.error(
                "the connection listening for other processes' changes to %s was lost:"
                " cached chats are dropped and none kept until it is back",
                self.shown,
            )
            self._told("")

    async def listen_again(self) -> None:
        """Housekeeping, every second: with the listening connection lost, connect again.
        What changed meanwhile is unknown, so everything cached is forgotten."""
        if self.listening:
            return
        try:
            conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
        except FAILURES:
            return  # PostgreSQL is still away: the next round tries again
        old, self._listener = self._listener, None
        if old is not None:
            old.terminate()
        try:
            await self._listen(conn)
        except BaseException:
            await conn.close()
            raise
        self._told("")
        log.warning("listening for other processes' changes to %s again", self.shown)

    def refuse_writes(self, why: str) -> None:
        if self.damage is None:
            self.damage = TAKEN_OVER
            log.error("%s: writes are refused until the server is restarted", why)

    def _heard(self, conn: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        self._told(payload)

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        with unavailable_on_failure():
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return await PostgresTransaction(conn).fetchall(sql, params)

    async def tables(self) -> set[str]:
        return {row[0] for row in await self.fetchall(TABLES)}

    async def probe_write(self) -> None:
        await self.execute_write(
            "INSERT INTO settings (name, value) VALUES ('write_probe', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(os.getpid()),),
        )

    @property
    def shown(self) -> str:
        return mask_url(self.url)


def _nobody(topic: str) -> None:
    """Told of changes until someone listens."""


@contextmanager
def unavailable_on_failure() -> Iterator[None]:
    """A failure of PostgreSQL or of the way to it, raised as StorageUnavailable; a value
    it refused, as UnstorableValue."""
    try:
        yield
    except DATA_ERRORS as err:
        raise UnstorableValue("Database", err) from err
    except FAILURES as err:
        raise StorageUnavailable(
            "Database", describe_failure(err), postgres_failure_reason(err)
        ) from err


def describe_failure(err: BaseException) -> str:
    """The failure in one line; for a refused connection, why it may be."""
    described = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, asyncpg.TooManyConnectionsError):
        described += (
            " (PostgreSQL's max_connections or the role's CONNECTION LIMIT is reached; each"
            " server opens up to QP_DATABASE_POOL + QP_DATABASE_QUICK_POOL + 2 connections)"
        )
    return described.replace("\n", " ")
