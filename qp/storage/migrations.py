"""The migration runner: applies the steps of qp/storage/schema.py that a database has not
had, in order, in one transaction at start-up, the same way on SQLite and PostgreSQL (a
small adapter for each says where its version is kept and how a transaction is taken).

One version scheme on both: the version is the number of the list's steps applied. Steps
are only ever added at the end, and a database is always brought to the end in one
transaction, so the steps applied are the first N and N says which. A number rather than
a table of step names: SQLite keeps it where it always has (`PRAGMA user_version`, 0 in a
D1 export), PostgreSQL in its one-row `qp_schema` table, so an older server still refuses
a newer database on both, and "newer than this server" is one comparison. On PostgreSQL
the transaction holds an advisory lock, so processes starting together never race (the
second waits, then finds the schema current).

SQLite's versions 0..9 from before the one list are its first nine steps, unchanged.
PostgreSQL's `qp_schema` counted steps of its own, 1..6 (schema.POSTGRES_OLD_STEPS says
what each made); every database the runner leaves is at SCHEMA_VERSION, past them all
from the start, so an old number is never taken for a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiosqlite
import asyncpg

from qp.storage.schema import POSTGRES_OLD_STEPS, STEPS, Step

SCHEMA_VERSION = len(STEPS)
# pg_advisory_xact_lock key taken while the schema is brought up to date ("qp-mig").
MIGRATION_LOCK = 0x71702D6D6967
# Whether qp_schema is there: the catalog read as a table, so that one another process has
# just made is seen (to_regclass answers from a cache that may not know it yet).
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS qp_schema (version INTEGER NOT NULL)"
VERSION_RECORDED = """
SELECT EXISTS (
  SELECT FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'qp_schema'
)
"""


class SchemaTooNew(Exception):
    """The database was made by a newer qp-server."""


class Schema(Protocol):
    """A database as the runner sees it."""

    # What each version this database once counted in a numbering of its own had applied.
    old_steps: tuple[tuple[str, ...], ...]

    def statements(self, step: Step) -> tuple[str, ...]:
        """The step's statements for this database."""
        ...

    async def version(self) -> int:
        """The version recorded (0 for a database without one)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """One transaction, holding off any other process's migration until it ends."""
        ...

    async def execute(self, statement: str) -> None: ...

    async def set_version(self, version: int) -> None: ...


def applied_steps(version: int, old_steps: tuple[tuple[str, ...], ...]) -> set[str]:
    """The names of the steps a database at `version` has had."""
    if version <= len(old_steps):
        return {name for made in old_steps[:version] for name in made}
    return {step.name for step in STEPS[:version]}


def _refuse_if_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"schema version {version} is newer than this server's ({SCHEMA_VERSION})"
        )


async def migrate(schema: Schema) -> None:
    """Bring the database to SCHEMA_VERSION in one transaction; SchemaTooNew when it was
    made by a newer qp-server. One already current is not written to (a start on a full
    disk needs no room)."""
    version = await schema.version()
    _refuse_if_newer(version)
    if version == SCHEMA_VERSION:
        return
    async with schema.transaction():
        version = await schema.version()  # again: another process may have been first
        _refuse_if_newer(version)
        if version == SCHEMA_VERSION:
            return
        applied = applied_steps(version, schema.old_steps)
        for step in STEPS:
            if step.name not in applied:
                for statement in schema.statements(step):
                    await schema.execute(statement)
        await schema.set_version(SCHEMA_VERSION)


class SqliteSchema:
    """SQLite's side: the version in `PRAGMA user_version`; the writer connection's
    `BEGIN IMMEDIATE` holds off every other writer."""

    old_steps: tuple[tuple[str, ...], ...] = ()

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    def statements(self, step: Step) -> tuple[str, ...]:
        return step.sqlite

    async def version(self) -> int:
        ((version,),) = await self._conn.execute_fetchall("PRAGMA user_version")
        return int(version)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            await self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                await self._conn.execute("ROLLBACK")
            raise

    async def execute(self, statement: str) -> None:
        await self._conn.execute(statement)

    async def set_version(self, version: int) -> None:
        await self._conn.execute(f"PRAGMA user_version = {int(version)}")


class PostgresSchema:
    """PostgreSQL's side: the version in the one-row `qp_schema` table; the transaction
    holds the migration lock."""

    old_steps = POSTGRES_OLD_STEPS

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def statements(self, step: Step) -> tuple[str, ...]:
        return step.postgres

    async def version(self) -> int:
        if not await self._conn.fetchval(VERSION_RECORDED):
            return 0
        return int(await self._conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM qp_schema"))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            # Made (or found) under the lock before anything else, as before the one list:
            # the version is then read from the table itself, never from a stale catalog.
            await self._conn.execute(VERSION_TABLE)
            yield

    async def execute(self, statement: str) -> None:
        await self._conn.execute(statement)

    async def set_version(self, version: int) -> None:
        await self._conn.execute("DELETE FROM qp_schema")
        await self._conn.execute("INSERT INTO qp_schema (version) VALUES ($1)", version)
