"""What the features see of a database, whichever backend holds it: SQLite (the default,
qp/storage/sqlite.py) or PostgreSQL (qp/storage/postgres.py).

A write is a function given a `Transaction`; the function *is* the transaction: committed
if it returns, undone if it raises. Statements are written once, with `?` (or `:name`)
placeholders; each backend takes them in its own parameter style.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
# A statement's parameters: positional (?) or named (:name).
Parameters = Sequence[Any] | Mapping[str, Any]


class Transaction(Protocol):
    """The statements of one write, run in order inside its transaction."""

    async def execute(self, sql: str, params: Parameters = ()) -> int:
        """Run a statement; answers the rows it changed."""
        ...

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]: ...

    async def lock(self, key: str) -> None:
        """Hold `key` until the transaction ends: no other writer taking the same key, in any
        process, runs meanwhile (SQLite: every write already holds the whole database)."""
        ...


WriteFn = Callable[[Transaction], Awaitable[T]]


class Database(Protocol):
    """One database: transactions, one-statement helpers, and its health."""

    # Set once writes are refused for good (the file damaged, the database taken over).
    damage: str | None

    async def write(self, fn: WriteFn[T], *, maintenance: bool = False) -> T: ...

    async def execute_write(
        self, sql: str, params: Parameters = (), *, maintenance: bool = False
    ) -> int: ...

    async def execute_write_many(
        self, sql: str, params: Iterable[Sequence[Any]], *, maintenance: bool = False
    ) -> None: ...

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]: ...

    async def fetchone(self, sql: str, params: Parameters = ()) -> tuple[Any, ...] | None: ...

    async def ping(self) -> None: ...

    async def probe_write(self) -> None: ...

    async def changed_elsewhere(self) -> bool:
        """True when another process changed the database since the last call."""
        ...

    def check_file(self) -> str | None: ...

    def refuse_writes(self, why: str) -> None: ...

    async def reclaim(self) -> None:
        """Take the database's claim again if it was lost (housekeeping, every second)."""
        ...

    async def close(self) -> None: ...


class StatementHelpers:
    """The one-statement helpers, the same for every backend: each backend gives `write`
    and `fetchall`."""

    async def write(self, fn: WriteFn[T], *, maintenance: bool = False) -> T:
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def execute_write(
        self, sql: str, params: Parameters = (), *, maintenance: bool = False
    ) -> int:
        """Run one statement as its own transaction; answers the rows it changed."""

        async def execute(tx: Transaction) -> int:
            return await tx.execute(sql, params)

        return await self.write(execute, maintenance=maintenance)

    async def execute_write_many(
        self, sql: str, params: Iterable[Sequence[Any]], *, maintenance: bool = False
    ) -> None:
        """Run one statement for each set of parameters, all in one transaction."""

        async def execute(tx: Transaction) -> None:
            await tx.executemany(sql, params)

        await self.write(execute, maintenance=maintenance)

    async def fetchone(self, sql: str, params: Parameters = ()) -> tuple[Any, ...] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.fetchall("SELECT 1")


class Unchanged(Exception):
    """Raised inside a write function to roll back a change whose condition no longer holds."""
