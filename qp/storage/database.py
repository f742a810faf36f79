"""What the features see of a database, whichever backend holds it: SQLite (the default,
qp/storage/sqlite.py) or PostgreSQL (qp/storage/postgres.py).

A write is a function given a `Transaction`; the function *is* the transaction: committed
if it returns, undone if it raises. It awaits nothing but its transaction's statements
(SQLite runs it whole in its writer's thread, where nothing else can be awaited).
Statements are written once, with `?` (or `:name`) placeholders; each backend takes them
in its own parameter style.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from aiohttp import web

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

    async def notify(self, topic: str) -> None:
        """Tell the other processes sharing the database, once the transaction commits, that
        `topic` changed (`chat:ID`, `blocks`); SQLite has no others: nothing."""
        ...


WriteFn = Callable[[Transaction], Awaitable[T]]


class Statements(Protocol):
    """Transactions and queries."""

    async def write(
        self,
        fn: WriteFn[T],
        *,
        maintenance: bool = False,
        durable: bool = True,
        reserved: bool = False,
    ) -> T:
        """`fn` as one transaction. `durable=False`: its commit need not wait for the disk
        (what a database crash may forget: it is made durable by the next durable commit).
        `reserved`: on capacity kept apart from request traffic, which never waits behind
        it (the process lease's renewals; SQLite has one writer and no leases)."""
        ...

    async def execute_write(
        self, sql: str, params: Parameters = (), *, maintenance: bool = False, durable: bool = True
    ) -> int: ...

    async def execute_write_many(
        self,
        sql: str,
        params: Iterable[Sequence[Any]],
        *,
        maintenance: bool = False,
        durable: bool = True,
    ) -> None: ...

    async def execute_write_returning(
        self, sql: str, params: Parameters = (), *, durable: bool = True
    ) -> list[tuple[Any, ...]]:
        """One statement that changes rows and returns some. `durable=False`: its commit
        need not wait for the disk (counts and reservations a database crash may forget)."""
        ...

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]: ...

    async def fetchone(self, sql: str, params: Parameters = ()) -> tuple[Any, ...] | None: ...


# The damage of a server whose lock file another server took (refuse_writes), either backend.
TAKEN_OVER = "taken-over"


class Database(Statements, Protocol):
    """One database: transactions, one-statement helpers, and its health. (Who else
    writes to it is qp/storage/peers.py's.)"""

    # Set once writes are refused for good (the file damaged, the database taken over).
    damage: str | None

    async def ping(self) -> None: ...

    async def probe_write(self) -> None: ...

    async def tables(self) -> set[str]:
        """The names of the tables it holds (they differ by backend: PostgreSQL's shared
        counts and budget accounts are kept in memory on SQLite)."""
        ...

    def check_file(self) -> str | None: ...

    def refuse_writes(self, why: str) -> None:
        """From now on every write is refused (damage TAKEN_OVER): another server took a
        lock file of this one's."""
        ...

    async def close(self) -> None: ...


class StatementHelpers:
    """The one-statement helpers, the same for every backend: each backend gives `write`
    and `fetchall`."""

    async def write(
        self,
        fn: WriteFn[T],
        *,
        maintenance: bool = False,
        durable: bool = True,
        reserved: bool = False,
    ) -> T:
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def execute_write(
        self, sql: str, params: Parameters = (), *, maintenance: bool = False, durable: bool = True
    ) -> int:
        """Run one statement as its own transaction; answers the rows it changed."""

        async def execute(tx: Transaction) -> int:
            return await tx.execute(sql, params)

        return await self.write(execute, maintenance=maintenance, durable=durable)

    async def execute_write_many(
        self,
        sql: str,
        params: Iterable[Sequence[Any]],
        *,
        maintenance: bool = False,
        durable: bool = True,
    ) -> None:
        """Run one statement for each set of parameters, all in one transaction."""

        async def execute(tx: Transaction) -> None:
            await tx.executemany(sql, params)

        await self.write(execute, maintenance=maintenance, durable=durable)

    async def execute_write_returning(
        self, sql: str, params: Parameters = (), *, durable: bool = True
    ) -> list[tuple[Any, ...]]:
        """Run one statement that changes rows and returns some (RETURNING) on its own."""

        async def execute(tx: Transaction) -> list[tuple[Any, ...]]:
            return await tx.fetchall(sql, params)

        return await self.write(execute, durable=durable)

    async def fetchone(self, sql: str, params: Parameters = ()) -> tuple[Any, ...] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.fetchall("SELECT 1")


DATABASE = web.AppKey("database", Database)
