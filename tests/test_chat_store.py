"""ChatStore on a real SQLite database and a real blob folder, with the blob step held open
where a test needs a write caught half way."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from qp.chats.cache import ChatCache
from qp.chats.model import parse_chat
from qp.chats.store import ChatStore
from qp.storage.blobs import FileBlobStore
from qp.storage.sqlite import SqliteDatabase
from tests.helpers import make_chat


class HeldBlobStore(FileBlobStore):
    """A file store whose next `put`, once `hold()` is called, waits for `release()`."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._holding = False
        self.entered = asyncio.Event()
        self._released = asyncio.Event()

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._released.set()

    async def put(self, key: str, data: bytes) -> None:
        if self._holding:
            self._holding = False
            self.entered.set()
            await self._released.wait()
        await super().put(key, data)


@pytest.fixture
async def blobs(tmp_path: Path) -> HeldBlobStore:
    (tmp_path / "blobs").mkdir()
    return HeldBlobStore(tmp_path / "blobs")


@pytest.fixture
async def store(tmp_path: Path, blobs: HeldBlobStore) -> AsyncIterator[ChatStore]:
    db = await SqliteDatabase.open(tmp_path / "qp.sqlite3")
    # No cache: every read goes to the row and the blob, where a torn write would show.
    chat_store = ChatStore(db, blobs, ChatCache(0))
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


def pending_of(tmp_path: Path) -> str | None:
    with sqlite3.connect(tmp_path / "qp.sqlite3") as db:
        ((pending,),) = db.execute("SELECT pending FROM chats WHERE chat_id = 'the-chat'")
    return pending


async def test_a_read_during_an_update_sees_the_chat_wholly_old_or_wholly_new(store, blobs):
    await store.create(version(1), max_chats_per_app=10)
    blobs.hold()
    update = asyncio.create_task(store.update("the-chat", version(2)))
    await blobs.entered.wait()  # the row says v2 now; the blob still holds v1
    reading = asyncio.create_task(read(store))
    await asyncio.sleep(0.1)
    assert not reading.done(), "a read went ahead while a write of its chat was half done"
    blobs.release()
    await update
    assert await reading == ("v2", ["v2"] * 3)


async def test_settling_a_write_leaves_a_later_writes_note_alone(store, blobs, tmp_path):
    await store.create(version(1), max_chats_per_app=10)
    await store.update("the-chat", version(2))  # its note is now queued to be cleared
    blobs.hold()
    third = asyncio.create_task(store.update("the-chat", version(3)))
    await blobs.entered.wait()
    later_note = pending_of(tmp_path)
    assert later_note is not None and '"update"' in later_note
    await store.settled.flush()  # clears the notes of versions 1 and 2, not of 3
    # Were it cleared, a crash now would leave v3's row beside v2's blob, undetected.
    assert pending_of(tmp_path) == later_note
    blobs.release()
    await third
    await store.settled.flush()
    assert pending_of(tmp_path) is None
    assert await read(store) == ("v3", ["v3"] * 3)


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
    asyncio.run(store.put("chats/abc.json", b"[1,2,3]"))
    assert calls == [("fsync", "file of 7 bytes"), ("replace", "abc.json"), ("fsync", "folder")]
    assert (tmp_path / "blobs" / "chats" / "abc.json").read_bytes() == b"[1,2,3]"
    assert [p.name for p in (tmp_path / "blobs" / "chats").iterdir()] == ["abc.json"]
