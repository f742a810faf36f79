"""ChatStore on a real SQLite database and a real blob folder, with a blob step held open
where a test needs a write (or a read) caught half way."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from qp.chats.cache import ChatCache
from qp.chats.model import ChatExists, parse_chat
from qp.chats.sql import ONE
from qp.chats.store import ChatStore
from qp.errors import StorageUnavailable
from qp.storage.blobs import BlobReader, FileBlobStore
from qp.storage.peers import SoleWriter
from qp.storage.sqlite import SqliteDatabase
from tests.helpers import make_chat


class HeldBlobStore(FileBlobStore):
    """A file store whose next `put` (before or after it stores the blob), or next
    `open_reader` or `get`, once held, waits for `release()`."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._holding: str | None = None
        self.entered = asyncio.Event()
        self._released = asyncio.Event()
        self.fail_puts = False

    def hold(self, where: str = "before put") -> None:
        self._holding = where

    def release(self) -> None:
        self._released.set()

    async def _wait_if(self, where: str) -> None:
        if self._holding == where:
            self._holding = None
            self.entered.set()
            await self._released.wait()

    async def put(self, key: str, data: bytes) -> None:
        await self._wait_if("before put")
        if self.fail_puts:
            await super().put(key, data)  # stored, and answered as a failure (a late answer)
            raise StorageUnavailable("Storage", "put: no answer in time")
        await super().put(key, data)
        await self._wait_if("after put")

    async def open_reader(self, key: str) -> BlobReader | None:
        await self._wait_if("before read")
        return await super().open_reader(key)

    async def get(self, key: str) -> bytes | None:
        # A chat its row knows to be small is read whole, with get.
        await self._wait_if("before read")
        return await super().get(key)


@pytest.fixture
async def blobs(tmp_path: Path) -> HeldBlobStore:
    (tmp_path / "blobs").mkdir()
    return HeldBlobStore(tmp_path / "blobs")


@pytest.fixture
async def store(tmp_path: Path, blobs: HeldBlobStore) -> AsyncIterator[ChatStore]:
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    # No cache: every read goes to the row and the blob, where a torn write would show.
    chat_store = ChatStore(db, blobs, ChatCache(0), SoleWriter(db), abandon_seconds=60)
    yield chat_store
    await chat_store.close()
    await db.close()


def version(n: int) -> object:
    """Version n of one chat: its model and its messages both say n."""
    body = {"chat": make_chat("the-chat", model=f"v{n}", messages=[f"v{n}"] * 3)}
    return parse_chat(body, id_required=True, max_bytes=10**7, check_app=lambda app: None)


async def read(store: ChatStore) -> tuple[str, list[str]]:
    chat = orjson.loads(await store.get_json("the-chat"))
    return chat["model"], chat["messages"]


def blob_files(tmp_path: Path) -> list[str]:
    return sorted(
        str(path.relative_to(tmp_path / "blobs")) for path in (tmp_path / "blobs").rglob("*.json")
    )


def rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "qp.sqlite3") as db:
        return db.execute(sql).fetchall()


def named_blob(tmp_path: Path) -> str:
    ((rev,),) = rows(tmp_path, "SELECT blob_rev FROM chats WHERE chat_id = 'the-chat'")
    return f"chats/the-chat/{rev}.json"


async def drain(store: ChatStore) -> None:
    """Let the deletions that follow commits happen now."""
    await store.garbage.flush()


async def test_a_read_during_an_update_gets_the_old_chat_whole_without_waiting(store, blobs):
    await store.create(version(1), max_chats_per_app=10)
    blobs.hold("after put")
    update = asyncio.create_task(store.update("the-chat", version(2)))
    await blobs.entered.wait()  # the new blob is stored; its row is not committed
    assert await asyncio.wait_for(read(store), 5) == ("v1", ["v1"] * 3)
    blobs.release()
    await update
    assert await read(store) == ("v2", ["v2"] * 3)


async def test_an_update_leaves_one_blob_the_row_names_and_deletes_the_one_it_replaced(
    store, tmp_path
):
    await store.create(version(1), max_chats_per_app=10)
    first = named_blob(tmp_path)
    await store.update("the-chat", version(2))
    await drain(store)
    assert blob_files(tmp_path) == [named_blob(tmp_path)] != [first]
    assert rows(tmp_path, "SELECT * FROM chat_garbage") == []
    assert rows(tmp_path, "SELECT * FROM chat_writes") == []


async def test_a_put_that_lands_but_answers_late_leaves_the_chat_wholly_old(store, blobs, tmp_path):
    await store.create(version(1), max_chats_per_app=10)
    blobs.fail_puts = True
    with pytest.raises(StorageUnavailable):
        await store.update("the-chat", version(2))
    assert await read(store) == ("v1", ["v1"] * 3)
    # The late blob is there, named by no row; its intent keeps it from the collector
    # until the write's bound has passed.
    assert len(blob_files(tmp_path)) == 2
    await store.garbage.sweep()
    assert len(blob_files(tmp_path)) == 2
    store.garbage.abandon_seconds = -1  # every write begun so far is past its bound
    await store.garbage.sweep()
    assert blob_files(tmp_path) == [named_blob(tmp_path)]
    assert await read(store) == ("v1", ["v1"] * 3)


async def test_a_writer_held_past_its_bound_between_put_and_commit_fails_and_changes_nothing(
    store, blobs, tmp_path
):
    await store.create(version(1), max_chats_per_app=10)
    blobs.hold("after put")
    update = asyncio.create_task(store.update("the-chat", version(2)))
    await blobs.entered.wait()
    store.garbage.abandon_seconds = -1  # every write begun so far is past its bound
    await store.garbage.sweep()  # gives the write up and deletes its blob
    assert blob_files(tmp_path) == [named_blob(tmp_path)]
    blobs.release()
    with pytest.raises(StorageUnavailable):
        await update
    assert await read(store) == ("v1", ["v1"] * 3)
    assert blob_files(tmp_path) == [named_blob(tmp_path)]


async def test_concurrent_updates_of_one_chat_last_commit_wins_and_leave_no_garbage(
    store, tmp_path
):
    await store.create(version(0), max_chats_per_app=10)
    await asyncio.gather(*(store.update("the-chat", version(n)) for n in range(1, 21)))
    await drain(store)
    model, messages = await read(store)
    assert messages == [model] * 3
    assert blob_files(tmp_path) == [named_blob(tmp_path)]


async def test_a_read_whose_blob_is_superseded_under_it_reads_the_new_row(store, blobs):
    await store.create(version(1), max_chats_per_app=10)
    blobs.hold("before read")
    reading = asyncio.create_task(read(store))
    await blobs.entered.wait()  # the read has the row of v1, not yet its blob
    await store.update("the-chat", version(2))
    await drain(store)  # v1's blob is gone
    blobs.release()
    assert await reading == ("v2", ["v2"] * 3)


async def test_a_refused_create_leaves_no_blob(store, tmp_path):
    await store.create(version(1), max_chats_per_app=10)
    with pytest.raises(ChatExists):
        await store.create(version(2), max_chats_per_app=10)
    await drain(store)
    assert blob_files(tmp_path) == [named_blob(tmp_path)]


async def test_a_write_waits_for_another_connections_write_transaction(store, tmp_path):
    """Writes begin IMMEDIATE: beside another process's open write transaction they wait
    (busy timeout) instead of failing "database is locked" when they upgrade a read."""
    other = sqlite3.connect(tmp_path / "qp.sqlite3", isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO settings (name, value) VALUES ('held', 'by another process')")
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, other.execute, "COMMIT")
    await store.create(version(1), max_chats_per_app=10)
    other.close()
    assert await read(store) == ("v1", ["v1"] * 3)


def test_a_blob_file_is_synced_then_renamed_then_its_folder_synced(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            calls.append(("fsync", "folder"))
        else:
            calls.append(("fsync", f"file of {os.fstat(fd).st_size} bytes"))
        real_fsync(fd)

    def replace(source: str, target: Path) -> None:
        calls.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = FileBlobStore.open(tmp_path / "blobs")
    asyncio.run(store.put("chats/abc/r1.json", b"[1,2,3]"))
    # chats/ and chats/abc/ are new: each is synced into its parent before the file.
    assert calls == [
        ("fsync", "folder"),
        ("fsync", "folder"),
        ("fsync", "file of 7 bytes"),
        ("replace", "r1.json"),
        ("fsync", "folder"),
    ]
    calls.clear()
    asyncio.run(store.put("chats/abc/r2.json", b"[1]"))
    assert calls == [("fsync", "file of 3 bytes"), ("replace", "r2.json"), ("fsync", "folder")]
    assert (tmp_path / "blobs" / "chats" / "abc" / "r1.json").read_bytes() == b"[1,2,3]"
    assert sorted(p.name for p in (tmp_path / "blobs" / "chats" / "abc").iterdir()) == [
        "r1.json",
        "r2.json",
    ]


class HeldDatabase(SqliteDatabase):
    """A real SQLite database whose next read of a chat's row, once held, has read the row
    but waits for `release()` before it answers."""

    holding = False
    entered: asyncio.Event
    released: asyncio.Event

    def hold(self) -> None:
        self.holding, self.entered, self.released = True, asyncio.Event(), asyncio.Event()

    async def fetchall(self, sql: str, params=()) -> list:
        rows = await super().fetchall(sql, params)
        if self.holding and sql == ONE:
            self.holding = False
            self.entered.set()
            await self.released.wait()
        return rows


async def test_a_read_that_began_before_an_update_never_caches_the_old_chat(tmp_path, blobs):
    db = await HeldDatabase.open(tmp_path / "cached.sqlite3")
    store = ChatStore(db, blobs, ChatCache(10**6), SoleWriter(db))
    try:
        await store.create(version(1), max_chats_per_app=10)
        db.hold()
        reading = asyncio.create_task(read(store))
        await db.entered.wait()  # the read has v1's row; v1's blob is not deleted yet
        await store.update("the-chat", version(2))
        db.released.set()
        assert await reading == ("v1", ["v1"] * 3)  # it began before the update
        assert await read(store) == ("v2", ["v2"] * 3)  # and left nothing old in the cache
    finally:
        await store.close()
        await db.close()


async def test_a_write_cancelled_while_it_waits_to_begin_leaves_later_writes_working(tmp_path):
    """aiosqlite runs a BEGIN whose waiter was cancelled anyway: it must still be ended."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    other = sqlite3.connect(tmp_path / "qp.sqlite3", isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")  # the writer's BEGIN waits for this one
        waiting = asyncio.create_task(db.probe_write())
        for _ in range(20):  # let it reach its BEGIN
            await asyncio.sleep(0)
        waiting.cancel()
        other.execute("COMMIT")  # the cancelled BEGIN now goes through, in its thread
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await db.execute_write("INSERT INTO settings (name, value) VALUES ('after', 'ok')")
        assert await db.fetchall("SELECT value FROM settings WHERE name = 'after'") == [("ok",)]
    finally:
        other.close()
        await db.close()


async def test_a_write_whose_caller_left_goes_on_and_the_store_waits_for_it_at_close(
    tmp_path, blobs, caplog
):
    """A caller cancelled while its write's blob is being put (a client that left): the
    write goes on to its end, here a failure no one is left to hear, which is not logged
    as an error ("never retrieved"); the store's close waits for it, so it never reaches
    a database closed under it."""
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    store = ChatStore(db, blobs, ChatCache(0), SoleWriter(db), abandon_seconds=60)
    blobs.hold("before put")
    blobs.fail_puts = True
    writing = asyncio.ensure_future(store.create(version(1), max_chats_per_app=10))
    await blobs.entered.wait()
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # still waiting for the write it has in hand
    blobs.release()
    await closing
    await db.close()
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # The write took effect nowhere: its intent was left for the sweep, no row.
    assert sqlite3.connect(tmp_path / "qp.sqlite3").execute("SELECT * FROM chats").fetchall() == []
