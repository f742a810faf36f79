"""SQLite through aiosqlite: one writer connection and a pool of read-only readers. Plumbing
only: the features keep their own SQL (chats/sql.py, spend/ledger.py, protection/blocks.py)
and call the helpers here.

Every write is a function run inside `BEGIN IMMEDIATE` on the single writer connection; the
function *is* the transaction (`execute_write` for a single statement). Reads use their own
connections (WAL mode), so a slow write never blocks a read.

The writer connection belongs to one thread of its own, and a transaction is one call into
it, whatever its statements: a write function awaits only its transaction's statements,
which are done when called, so its coroutine runs to its end in that thread at one step
(`_run_to_end`). A round trip per statement, as aiosqlite makes, cost most of a write's time
once several threads (blob writes) took turns at the interpreter.

Writes are committed in groups: those that queue while a commit waits for the disk share
the next transaction and its fsync (one writer task takes up to MAX_GROUP of them, runs
each in a savepoint of its own, commits once, then answers each). So a write still sees
every write before it (a count, a duplicate key), one that raises is undone alone and its
caller gets its exception, and nobody is answered before the commit is on disk.

A database file deleted, replaced, truncated or overwritten under a running server goes on
taking SQLite's writes into a file no restart will find, so every commit is checked
against the file at the path before it counts, and a file found wrong refuses every write
after it until a restart.

SqliteDatabase holds the writer's whole life: opening it (read-only when the disk is full),
its transactions, the check of the file after each commit, and the change counter by which
the operators' tools' commits are noticed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from qp.errors import (
    FULL,
    READ_ONLY,
    UNAVAILABLE,
    StorageUnavailable,
    UnstorableValue,
    os_error_reason,
)
from qp.storage.database import (
    TAKEN_OVER,
    Parameters,
    StatementHelpers,
    WriteFn,
)
from qp.storage.file_watch import DAMAGED, DatabaseFile
from qp.storage.migrations import SqliteSchema, migrate

log = logging.getLogger("qp.storage.sqlite")

READER_COUNT = 4
BUSY_TIMEOUT_MS = 5000
# Writes sharing one transaction at most, and waiting for one at most (past it: refused).
MAX_GROUP = 64
MAX_WAITING = 4096

T = TypeVar("T")
# Called when a maintenance write (a delete, a collection, start-up) fails for lack of space:
# frees some room and answers whether it did, so the write is tried once more.
MakeRoom = Callable[[], bool]

TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"
# Why a write (or a look at data_version) after the writer closed is refused.
CLOSED = "closed: the server is shutting down"


def sqlite_failure_reason(err: sqlite3.Error) -> str:
    """FULL, READ_ONLY or UNAVAILABLE for an error from SQLite."""
    code = getattr(err, "sqlite_errorcode", 0)
    if code & 0xFF == sqlite3.SQLITE_FULL or code == sqlite3.SQLITE_IOERR_SHMSIZE:
        return FULL
    if code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return READ_ONLY
    return UNAVAILABLE


# A value SQLite cannot take, not a failure: text that is not UTF-8 (a lone surrogate), an
# integer beyond 64 bits, a string or blob too big, a constraint the row breaks.
DATA_ERRORS = (UnicodeEncodeError, OverflowError, sqlite3.DataError, sqlite3.IntegrityError)


def _primary_code(err: sqlite3.Error) -> int:
    """The error's primary result code (its extended code's low byte)."""
    return int(getattr(err, "sqlite_errorcode", 0)) & 0xFF


def _is_busy(err: sqlite3.Error) -> bool:
    return _primary_code(err) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_corruption(err: sqlite3.Error) -> bool:
    return _primary_code(err) in (
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


def _every_commit_in_main_file(path: Path) -> bool:
    """True when the database exists with no write-ahead log holding commits beside it."""
    wal = path.with_name(path.name + "-wal")
    return path.exists() and (not wal.exists() or wal.stat().st_size == 0)


class SqliteTransaction:
    """A write's statements on the writer connection, in the writer's thread (see
    qp.storage.database): each is done when called, never suspending its caller."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    async def execute(self, sql: str, params: Parameters = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, params)

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    async def lock(self, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already holds the whole database."""

    async def notify(self, topic: str) -> None:
        """Nothing to do: no other server shares the file (the tools' writes are seen by
        polling `data_version`, qp/storage/peers.py)."""


def _run_to_end(write: Awaitable[T]) -> T:
    """A write function's coroutine, run to its end at once: it awaits only statements of
    a SqliteTransaction, which never suspend. One that does is a bug, refused whole."""
    steps = write.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    steps.close()
    raise RuntimeError("a SQLite write function awaited something other than its statements")


class WriterThread:
    """The writer connection and the one thread that runs everything done on it, in the
    order asked: a transaction is one call, never interleaved with another."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection):
        self._executor = executor
        self._conn = conn
        # Whether commits wait for the disk now (synchronous FULL, as opened); only the
        # thread reads and sets it.
        self._durable: bool | None = True

    @classmethod
    async def open(cls, path: Path) -> WriterThread:
        executor = ThreadPoolExecutor(1, thread_name_prefix="qp-sqlite-writer")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, _open_writer, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    async def run(self, job: Callable[[WriterThread], T]) -> T:
        """`job(self)` in the writer's thread. A caller cancelled meanwhile does not stop a
        job already begun: a transaction ends in its commit or its rollback, whole."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, job, self)

    def transaction(self, fn: WriteFn[T], durable: bool) -> T:
        """In the thread: `fn` as one transaction."""
        self._begin(durable)
        try:
            result = _run_to_end(fn(SqliteTransaction(self._conn)))
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return result

    def group(self, fns: list[WriteFn[Any]], durable: bool) -> list[tuple[Any, Exception | None]]:
        """In the thread: each write in its own savepoint of one transaction. One that
        raises is rolled back alone (its error kept for its caller), the rest commit
        together. A database failure (not a value it refuses) ends the whole transaction."""
        conn = self._conn
        outcomes: list[tuple[Any, Exception | None]] = []
        self._begin(durable)
        try:
            for fn in fns:
                conn.execute("SAVEPOINT member")
                try:
                    value: Any = _run_to_end(fn(SqliteTransaction(conn)))
                except Exception as err:
                    if isinstance(err, sqlite3.Error) and not isinstance(err, DATA_ERRORS):
                        raise
                    conn.execute("ROLLBACK TO member")
                    conn.execute("RELEASE member")
                    refused = (
                        UnstorableValue("Database", err) if isinstance(err, DATA_ERRORS) else err
                    )
                    outcomes.append((None, refused))
                else:
                    conn.execute("RELEASE member")
                    outcomes.append((value, None))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return outcomes

    def data_version(self) -> int:
        """In the thread: SQLite's data_version, which moves only with other connections'
        commits."""
        ((version,),) = self._conn.execute("PRAGMA data_version").fetchall()
        return int(version)

    def close(self) -> None:
        """In the thread: the connection closed."""
        self._conn.close()

    def shutdown(self) -> None:
        """The thread let go once it has run what it was given."""
        self._executor.shutdown(wait=False)

    def _begin(self, durable: bool) -> None:
        if self._durable is not durable:
            self._durable = None  # unknown until the pragma is done
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        self._conn.execute("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        # SQLite may have rolled back already (a full disk does that to a commit): then
        # there is nothing to do.
        if self._conn.in_transaction:
            with suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")


def _open_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA mmap_size = 0")
        # FULL: a commit is on disk before the client is told its chat is saved.
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(slots=True)
class _QueuedWrite:
    fn: WriteFn[Any]
    durable: bool
    answer: asyncio.Future[Any]


class SqliteDatabase(StatementHelpers):
    """The SQLite database: `write(fn)` for transactions, `reader()` for queries."""

    def __init__(
        self,
        writer: WriterThread | None,
        readers: list[aiosqlite.Connection],
        file: DatabaseFile,
        make_room: MakeRoom | None = None,
    ):
        # None: opened read-only because the disk was full (see `open`).
        self._writer = writer
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers = readers
        self._file = file
        self._make_room = make_room
        # Set once the file is found deleted, replaced or damaged: writes refused until restart.
        self.damage: str | None = None
        for conn in readers:
            self._readers.put_nowait(conn)
        self._waiting: deque[_QueuedWrite] = deque()
        self._committer: asyncio.Task[None] | None = None
        # Set once the writer is closed: a write that comes after is refused as unavailable.
        self._closed = False
        # Groups committed, and the writes they held (a group of one counts too).
        self.groups_committed = 0
        self.writes_committed = 0

    @classmethod
    async def open(
        cls, path: Path, reader_count: int = READER_COUNT, make_room: MakeRoom | None = None
    ) -> SqliteDatabase:
        """Open (creating if needed) the database, bring its schema up to date, open the
        readers.

        On a full disk, `make_room` is asked for room once; failing that, a database whose
        every commit is in its main file (no write-ahead log left) opens read-only: reads
        are served, writes refused (FULL) until a restart with room.
        """
        try:
            return await cls._open(path, reader_count, make_room)
        except sqlite3.Error as err:
            if sqlite_failure_reason(err) != FULL:
                raise
            full = err
        if make_room is not None and make_room():
            try:
                return await cls._open(path, reader_count, make_room)
            except sqlite3.Error as err:
                if sqlite_failure_reason(err) != FULL:
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
    async def _open(
        cls, path: Path, reader_count: int, make_room: MakeRoom | None
    ) -> SqliteDatabase:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The schema brought up to date on a connection of its own, closed before the
        # writer's thread opens the one for good.
        schema = await connect(str(path))
        try:
            await schema.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # No memory-mapped I/O: a file truncated under a mapping kills the process (SIGBUS).
            await schema.execute("PRAGMA mmap_size = 0")
            ((mode,),) = await schema.execute_fetchall("PRAGMA journal_mode")
            if mode != "wal":
                await schema.execute("PRAGMA journal_mode = WAL")
            await schema.execute("PRAGMA synchronous = FULL")
            await migrate(SqliteSchema(schema))
        finally:
            await schema.close()
        async with AsyncExitStack() as opened:
            writer = await WriterThread.open(path)
            opened.callback(writer.shutdown)
            opened.push_async_callback(writer.run, WriterThread.close)
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
        """Commit what is queued, then close. Shielded: a cancelled close (a second signal)
        leaves the writes in hand to be answered, not cut off half way."""
        if self._committer is not None:
            await asyncio.gather(asyncio.shield(self._committer), return_exceptions=True)
        try:
            for conn in self._all_readers:
                await conn.close()
            if self._writer is not None:
                self._closed = True
                await self._writer.run(WriterThread.close)
                self._writer.shutdown()
        finally:
            self._file.close()

    async def write(
        self,
        fn: WriteFn[T],
        *,
        maintenance: bool = False,
        durable: bool = True,
        reserved: bool = False,
    ) -> T:
        """Run `fn(conn)` as one transaction on the writer: committed if it returns, else undone.

        Not `durable`: committed without an fsync of the log (synchronous=NORMAL), which the
        next durable commit makes (WAL keeps commits in order); a process crash keeps it.
        A `maintenance` write (a delete, a collection) that fails for lack of space is tried once
        more after the reserve's room is given back; client writes never take that room.
        Others are committed in groups (see the module's docstring).
        """
        if not maintenance:
            return await self._grouped(fn, durable)
        writer = self._writable()
        try:
            try:
                result = await writer.run(lambda thread: thread.transaction(fn, durable))
            except sqlite3.Error as err:
                if not (sqlite_failure_reason(err) == FULL and self._room()):
                    raise
                result = await writer.run(lambda thread: thread.transaction(fn, durable))
        except (*DATA_ERRORS, sqlite3.Error) as err:
            raise self._storage_error(err) from err
        # Only now does the commit count: it must be in the file a restart opens.
        self.verify_file()
        return result

    def _writable(self) -> WriterThread:
        self._refuse_if_damaged()
        if self._writer is None:
            raise StorageUnavailable(
                "Database", "opened read-only: the disk was full at start-up", FULL
            )
        if self._closed:
            raise StorageUnavailable("Database", CLOSED)
        return self._writer

    async def _grouped(self, fn: WriteFn[T], durable: bool) -> T:
        self._writable()
        if len(self._waiting) >= MAX_WAITING:
            raise StorageUnavailable("Database", f"{MAX_WAITING} writes are waiting already")
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append(_QueuedWrite(fn, durable, answer))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_groups())
        return await answer

    async def _commit_groups(self) -> None:
        """Commit what waits, a group at a time, until nothing does (cancelled, as at the
        end of a shutdown: what still waits is refused)."""
        try:
            while self._waiting:
                group: list[_QueuedWrite] = []
                while self._waiting and len(group) < MAX_GROUP:
                    queued = self._waiting.popleft()
                    if not queued.answer.cancelled():  # its caller left before it began
                        group.append(queued)
                if group:
                    await self._commit_group(group)
        except asyncio.CancelledError:
            self._refuse_waiting(StorageUnavailable("Database", "the server is shutting down"))
            raise

    async def _commit_group(self, group: list[_QueuedWrite]) -> None:
        """One transaction for the group, each write in a savepoint; every answer set the
        way the group ended, even when this task is cancelled meanwhile (the thread goes
        on to its commit or its rollback whatever happens here)."""
        fns = [queued.fn for queued in group]
        durable = any(queued.durable for queued in group)
        try:
            writer = self._writable()
        except StorageUnavailable as err:
            self._fail(group, err)
            return
        job = asyncio.ensure_future(writer.run(lambda thread: thread.group(fns, durable)))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if job.done():  # the job itself cancelled: the event loop is ending
                self._answer_job(group, job)
            else:
                job.add_done_callback(lambda done: self._answer_job(group, done))
            raise
        except Exception:
            pass  # the job's own failure: each write is told it below
        self._answer_job(group, job)

    def _answer_job(self, group: list[_QueuedWrite], job: asyncio.Future[list[Any]]) -> None:
        """The group's writes told how its job in the writer's thread ended."""
        error: BaseException
        if job.cancelled():  # only as the event loop itself ends
            error = StorageUnavailable("Database", "the write was cancelled")
        elif (err := job.exception()) is not None:
            told = self._storage_error(err)
            error = told if isinstance(told, Exception) else err
            if isinstance(err, sqlite3.Error) and _is_busy(err):
                # Another connection held the database past the busy timeout: the writes
                # waiting now would each wait as long again, one group after another, so
                # they are told now too.
                self._refuse_waiting(error)
        else:
            try:
                self.verify_file()
            except StorageUnavailable as damaged:
                error = damaged
            else:
                self._answer(group, job.result())
                return
        self._fail(group, error)

    def _answer(
        self, group: list[_QueuedWrite], outcomes: list[tuple[Any, Exception | None]]
    ) -> None:
        self.groups_committed += 1
        self.writes_committed += len(group)
        for queued, (value, refused) in zip(group, outcomes, strict=True):
            if queued.answer.done():
                continue
            if refused is None:
                queued.answer.set_result(value)
            else:
                queued.answer.set_exception(refused)

    @staticmethod
    def _fail(group: list[_QueuedWrite], error: BaseException) -> None:
        for queued in group:
            if not queued.answer.done():
                queued.answer.set_exception(error)

    def _refuse_waiting(self, error: BaseException) -> None:
        """Tell every waiting write `error`."""
        waiting = list(self._waiting)
        self._waiting.clear()
        self._fail(waiting, error)

    def _storage_error(self, err: BaseException) -> BaseException:
        """What a caller is told of a write's failure: a value SQLite refuses, the database
        unavailable (noting a damaged file), or any other error as it is."""
        if isinstance(err, DATA_ERRORS):
            return UnstorableValue("Database", err)
        if isinstance(err, sqlite3.Error):
            self._note_corruption(err)
            reason = sqlite_failure_reason(err)
            # A file made read-only under SQLite (immutable, a read-only remount) fails its
            # writes with a bare I/O error: told apart here, so that /healthz says so.
            if _primary_code(err) == sqlite3.SQLITE_IOERR and not self._files_writable():
                reason = READ_ONLY
            return StorageUnavailable("Database", str(err), reason)
        return err

    def _files_writable(self) -> bool:
        """Whether this process may write the database file and its WAL (as far as they
        exist), by the kernel's own checks: of the files (an immutable one fails it), then
        of their filesystem (one ext4 turned read-only after an error still calls its files
        writable, but refuses to make one)."""
        files = (self._file.path, self._file.wal_path)
        if not all(os.access(file, os.W_OK) for file in files if file.exists()):
            return False
        return _takes_new_files(self._file.path.parent)

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
        except DATA_ERRORS as err:
            raise UnstorableValue("Database", err) from err
        except sqlite3.Error as err:
            self._note_corruption(err)
            raise StorageUnavailable("Database", str(err), sqlite_failure_reason(err)) from err
        finally:
            self._readers.put_nowait(conn)

    async def data_version(self) -> int | None:
        """SQLite's data_version on the writer, which moves only with other connections'
        commits; None when opened read-only."""
        if self._writer is None:
            return None
        if self._closed:
            raise StorageUnavailable("Database", CLOSED)
        try:
            return await self._writer.run(WriterThread.data_version)
        except sqlite3.Error as err:
            raise StorageUnavailable("Database", str(err), sqlite_failure_reason(err)) from err

    async def fetchall(self, sql: str, params: Parameters = ()) -> list[tuple[Any, ...]]:
        async with self.reader() as conn:
            rows = await conn.execute_fetchall(sql, params)
        return [tuple(row) for row in rows]

    async def tables(self) -> set[str]:
        return {row[0] for row in await self.fetchall(TABLES)}

    async def probe_write(self) -> None:
        """One small real commit: does the database take writes (again)?"""

        await self.execute_write(
            "INSERT OR REPLACE INTO settings (name, value) VALUES ('write_probe', ?)",
            (str(os.getpid()),),
        )


def _takes_new_files(folder: Path) -> bool:
    """False when the filesystem refuses to make a file in `folder` as read-only. The file
    is unnamed (O_TMPFILE) and gone once closed; where the platform has no such file, True.
    Never an open and close of the database's own files: closing any descriptor of a file
    drops the process's POSIX locks on it, SQLite's own included."""
    unnamed = getattr(os, "O_TMPFILE", None)
    if unnamed is None:
        return True
    try:
        os.close(os.open(folder, unnamed | os.O_WRONLY, 0o600))
    except OSError as err:
        return os_error_reason(err) != READ_ONLY
    return True


def _read_only_uri(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro"
