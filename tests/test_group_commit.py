"""Group commit: chat writes that arrive together share one transaction and its fsync,
and each still gets the answer it would have got alone."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from qp.errors import StorageUnavailable, UnstorableValue
from qp.protection.blocks import lift_block, save_block
from qp.protection.rate_limits import RateLimiter
from qp.storage.database import DATABASE, Transaction
from qp.storage.sqlite import BUSY_TIMEOUT_MS, MAX_GROUP, MAX_WAITING, SqliteDatabase
from tests.helpers import WriterHold, call, make_chat, wait_for_log, wait_until


@contextlib.asynccontextmanager
async def holding_the_writer(db: SqliteDatabase) -> AsyncIterator[None]:
    """The writer's thread held inside a write (the first of its group) until the block
    ends, then that write committed; writes asked for meanwhile wait in the queue."""
    hold = WriterHold(db)
    try:
        await hold.held()
        yield
    finally:
        hold.release()
        await hold.task


class LockHolder:
    """Another connection to a database (an operator's tool) holding its write lock, from
    `take(path)` until `let_go()`."""

    def __init__(self) -> None:
        self._held, self._release = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    async def take(self, database: Path) -> None:
        self._thread = threading.Thread(target=self._hold, args=(database,))
        self._thread.start()
        assert await asyncio.to_thread(self._held.wait, 30)

    def let_go(self) -> None:
        self._release.set()
        if self._thread is not None:
            self._thread.join()

    def _hold(self, database: Path) -> None:
        conn = sqlite3.connect(database, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._held.set()
            self._release.wait(120)
            conn.execute("ROLLBACK")
        finally:
            conn.close()


@pytest.fixture
def lock_held_elsewhere() -> Iterator[LockHolder]:
    holder = LockHolder()
    yield holder
    holder.let_go()


async def create_all(http, chats: list[dict]) -> list[tuple[int, dict]]:
    return await asyncio.gather(
        *(call(http, "POST", "/api/chats", json={"chat": c}) for c in chats)
    )


async def test_the_chat_limit_stays_exact_inside_a_group(start_server):
    server = await start_server(QP_MAX_CHATS_PER_APP="5")
    db = server.app[DATABASE]
    assert isinstance(db, SqliteDatabase)
    chats = [make_chat(chat_id=f"limit-{n}", app="tight-app") for n in range(40)]
    answers = await create_all(server.client, chats)
    created = [chat for chat, (status, _) in zip(chats, answers, strict=True) if status == 200]
    refused = [body for status, body in answers if status != 200]
    assert len(created) == 5
    assert (
        refused
        == [{"error": "Chat limit exceeded for app tight-app. Maximum 5 chats allowed."}] * 35
    )
    stored = server.database.rows("SELECT chat_id FROM chats WHERE app = ?", ("tight-app",))
    assert sorted(row["chat_id"] for row in stored) == sorted(c["chatId"] for c in created)
    # The writes did share transactions: fewer groups than writes, as /metrics shows.
    assert db.groups_committed < db.writes_committed
    async with server.client.get("/metrics") as response:
        text = await response.text()
    counted = dict(
        re.findall(r"^(qp_write_groups_total|qp_grouped_writes_total) (\S+)$", text, re.M)
    )
    assert 1 <= float(counted["qp_write_groups_total"]) < float(counted["qp_grouped_writes_total"])


async def test_one_id_created_at_once_many_times_is_one_200_and_409s(start_server):
    server = await start_server()
    chats = [
        make_chat("same-id", "dup-app", messages=[{"role": "user", "content": f"copy {n}"}])
        for n in range(20)
    ]
    answers = await create_all(server.client, chats)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [409] * 19
    assert [body for status, body in answers if status == 409] == [
        {"error": "Chat already exists"}
    ] * 19
    status, stored = await call(server.client, "GET", "/api/chats/same-id")
    assert status == 200
    winner = next(chat for chat, (s, _) in zip(chats, answers, strict=True) if s == 200)
    assert stored["messages"] == winner["messages"]


async def test_a_write_that_fails_in_a_group_fails_alone(tmp_path):
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY, v INTEGER)")

        def insert(n: int, value: object):
            async def write(tx: Transaction) -> int:
                await tx.execute("INSERT INTO t (n, v) VALUES (?, ?)", (n, value))
                if n == 7:
                    raise LookupError("member 7 changes its mind")
                return n

            return write

        # 2**70 does not fit SQLite's integer: a value the database refuses.
        writes = [db.write(insert(n, 2**70 if n == 3 else n)) for n in range(20)]
        before = db.groups_committed
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(results[3], UnstorableValue)
        assert isinstance(results[7], LookupError)
        assert [r for n, r in enumerate(results) if n not in (3, 7)] == [
            n for n in range(20) if n not in (3, 7)
        ]
        assert db.groups_committed - before < 20
        rows = await db.fetchall("SELECT n FROM t ORDER BY n")
        assert [n for (n,) in rows] == [n for n in range(20) if n not in (3, 7)]
    finally:
        await db.close()


async def test_a_caller_that_leaves_before_its_group_starts_writes_nothing(tmp_path):
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        async with holding_the_writer(db):
            left = asyncio.create_task(db.execute_write("INSERT INTO t (n) VALUES (1)"))
            stays = asyncio.create_task(db.execute_write("INSERT INTO t (n) VALUES (2)"))
            await asyncio.sleep(0)  # both queued behind the group holding the writer
            left.cancel()
        assert await stays == 1
        with pytest.raises(asyncio.CancelledError):
            await left
        assert await db.fetchall("SELECT n FROM t") == [(2,)]
    finally:
        await db.close()


async def test_a_write_that_awaits_anything_but_its_statements_is_refused_alone(tmp_path):
    """A write runs whole in the writer's thread: one that awaits something else (a bug)
    is rolled back and its caller told, and the group's other writes commit."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")

        async def waits(tx: Transaction) -> None:
            await tx.execute("INSERT INTO t (n) VALUES (0)")
            await asyncio.sleep(0)

        results = await asyncio.gather(
            db.write(waits),
            db.execute_write("INSERT INTO t (n) VALUES (1)"),
            return_exceptions=True,
        )
        assert isinstance(results[0], RuntimeError)
        assert str(results[0]) == (
            "a SQLite write function awaited something other than its statements"
        )
        assert results[1] == 1
        assert await db.fetchall("SELECT n FROM t") == [(1,)]
    finally:
        await db.close()


V2 = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "second write"}]


def test_every_acknowledged_write_survives_a_sigkill(qp_server):
    server = qp_server()

    async def write_many() -> list[tuple[str, dict]]:
        async with aiohttp.ClientSession(server.url) as http:
            chats = [make_chat(chat_id=f"kept-{n}", app=f"app-{n % 3}") for n in range(150)]
            answers = await create_all(http, chats)
            updates = [
                call(
                    http,
                    "PUT",
                    f"/api/chats/kept-{n}",
                    json={"chat": make_chat(f"kept-{n}", f"app-{n % 3}", messages=V2)},
                )
                for n in range(0, 150, 2)
            ]
            updated = await asyncio.gather(*updates)
        assert all(status == 200 for status, _ in answers)
        assert all(status == 200 for status, _ in updated)
        return [(c["chatId"], c) for c in chats]

    written = asyncio.run(write_many())
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server.start()

    async def read_back() -> None:
        async with aiohttp.ClientSession(server.url) as http:
            for chat_id, chat in written:
                status, stored = await call(http, "GET", f"/api/chats/{chat_id}")
                assert status == 200, chat_id
                n = int(chat_id.split("-")[1])
                assert stored["messages"] == (V2 if n % 2 == 0 else chat["messages"])

    asyncio.run(read_back())
    server.stop()


async def test_writes_past_the_waiting_bound_are_refused_not_queued(tmp_path):
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        async with holding_the_writer(db):
            waiting = [
                asyncio.create_task(db.execute_write("INSERT INTO t (n) VALUES (?)", (n,)))
                for n in range(MAX_WAITING + 1)
            ]
            # The last one found the queue full: refused at once, while the rest still wait.
            with pytest.raises(StorageUnavailable, match=f"{MAX_WAITING} writes are waiting"):
                await waiting[-1]
            assert not any(task.done() for task in waiting[:-1])
        assert await asyncio.gather(*waiting[:-1]) == [1] * MAX_WAITING
        assert await db.fetchall("SELECT COUNT(*) FROM t") == [(MAX_WAITING,)]
    finally:
        await db.close()


async def test_writes_waiting_behind_a_lock_held_elsewhere_are_told_within_a_busy_timeout(
    tmp_path, lock_held_elsewhere
):
    """A tool holds the write lock past the busy timeout: the first group fails with 503,
    and so do the writes waiting behind it, at once, not a busy timeout per group (256
    writes took 20 s, a full queue would take minutes, and a shutdown as long)."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        await lock_held_elsewhere.take(tmp_path / "qp.sqlite3")
        began = time.monotonic()
        writes = [
            db.execute_write("INSERT INTO t (n) VALUES (?)", (n,)) for n in range(4 * MAX_GROUP)
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        took = time.monotonic() - began
        assert all(isinstance(result, StorageUnavailable) for result in results), results
        assert {str(result) for result in results} == {"Database: database is locked"}
        assert took < 2 * BUSY_TIMEOUT_MS / 1000, f"the last write was told after {took:.1f} s"
    finally:
        await db.close()


async def test_a_write_after_close_is_storage_unavailable(tmp_path):
    """A write that outlives the server's handlers (a shielded chat write at shutdown)
    and reaches the database after it closed is refused as unavailable: a 503, not an
    error the server did not expect."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    await db.close()
    for maintenance in (False, True):
        with pytest.raises(StorageUnavailable, match="closed: the server is shutting down"):
            await db.execute_write("INSERT INTO t (n) VALUES (1)", maintenance=maintenance)
    assert sqlite3.connect(tmp_path / "qp.sqlite3").execute("SELECT n FROM t").fetchall() == []


async def test_a_cancelled_close_still_answers_every_write_by_how_it_ended(tmp_path):
    """close() cancelled (a second signal during shutdown) while a group runs in the
    writer's thread: that group commits, and its writes are told so, not cancelled; the
    write queued behind it is committed and answered too."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    await db.execute_write("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    hold = WriterHold(db)
    await hold.held()
    beside = asyncio.ensure_future(db.execute_write("INSERT INTO t (n) VALUES (1)"))
    closing = asyncio.ensure_future(db.close())
    await asyncio.sleep(0)  # close is waiting for the committer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    hold.release()
    assert await hold.task is None
    assert await asyncio.wait_for(beside, 30) == 1
    await db.close()
    assert sqlite3.connect(tmp_path / "qp.sqlite3").execute("SELECT n FROM t").fetchall() == [(1,)]


async def test_a_block_lift_whose_caller_leaves_mid_commit_still_unblocks_here(tmp_path):
    """The admin's request goes away while the lift's delete is in the writer's thread:
    the delete commits, and this server serves the client again (it does not hear its own
    commits, so the unblock must not depend on the caller staying)."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    try:
        client = "c" * 64
        await save_block(db, client, "2026-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z")

        async def saved(client: str, until: float) -> None:
            pass

        limiter = RateLimiter({client: time.time() + 86400}, saved)
        first = WriterHold(db)
        await first.held()
        lifting = asyncio.ensure_future(lift_block(db, limiter, client))
        # Until the lift's delete is queued behind the held write.
        await wait_until(lambda: bool(db._waiting), 30, "the lift's delete queued")
        # Queued after the delete, in the same group: once it holds the thread, the
        # delete has run and the group is not committed yet.
        second = WriterHold(db)
        await asyncio.sleep(0)
        first.release()
        await second.held()
        lifting.cancel()  # the admin's client went away
        second.release()
        await asyncio.gather(first.task, second.task)
        with pytest.raises(asyncio.CancelledError):
            await lifting
        assert await db.fetchall("SELECT client_hash FROM blocks") == []
        await wait_until(lambda: limiter.blocked(client) is None, 10, "served again here")
    finally:
        await db.close()


async def test_a_lock_held_elsewhere_is_503_within_a_busy_timeout_and_reads_go_on(
    qp_server, lock_held_elsewhere
):
    """Another program (an operator's own sqlite3 session) holds the write lock: the writes
    then waiting get 503 within about the busy timeout, nothing changed, while reads are
    served; once it lets go, writes work again."""
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        kept = make_chat("kept", "locked", messages=["kept"])
        assert (await call(http, "POST", "/api/chats", json={"chat": kept}))[0] == 200
        _, before = await call(http, "GET", "/api/chats/kept")
        await lock_held_elsewhere.take(server.data_dir / "qp.sqlite3")
        began = time.monotonic()
        writes = [
            call(http, "POST", "/api/chats", json={"chat": make_chat(f"new-{n}", "locked")})
            for n in range(100)
        ]
        answers, read = await asyncio.gather(
            asyncio.gather(*writes), call(http, "GET", "/api/chats/kept")
        )
        assert answers == [(503, {"error": "Storage unavailable"})] * 100
        # Two groups at least (64 writes each at most): not a busy timeout each in turn.
        assert time.monotonic() - began < 1.8 * BUSY_TIMEOUT_MS / 1000
        assert read == (200, before)
        await wait_for_log(server, "POST /api/chats: Database: database is locked")
        lock_held_elsewhere.let_go()
        assert (await call(http, "GET", "/api/chats/new-0"))[0] == 404
        again = make_chat("after", "locked")
        assert await call(http, "POST", "/api/chats", json={"chat": again}) == (
            200,
            {"chatId": "after"},
        )
