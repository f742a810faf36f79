"""When the blob store fails: 503 JSON, and nothing already saved is lost or half-changed."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ADMIN_KEY, call, create, make_chat, unhealthy
from tests.processes import QPServer, SeaweedFS

STORAGE_UNAVAILABLE = (503, {"error": "Storage unavailable"})


class BrokenFolder:
    """Make writes under the file store's `chats/` folder fail, then mend it.

    Root ignores permissions, so the folder is swapped for a plain file: creating a temp
    file inside it fails the way a full or read-only disk would.
    """

    def __init__(self, blobs: Path):
        self.folder = blobs / "chats"
        self.aside = blobs / "chats.aside"

    def __enter__(self) -> None:
        self.folder.rename(self.aside)
        self.folder.write_bytes(b"")

    def __exit__(self, *exc) -> None:
        self.folder.unlink()
        self.aside.rename(self.folder)


@pytest.fixture
def file_server(tmp_path) -> Iterator[QPServer]:
    server = QPServer(tmp_path / "qp", {"ADMIN_KEY": ADMIN_KEY}).start()
    yield server
    server.stop()


async def test_failed_blob_write_on_create_is_503_and_leaves_no_row(file_server):
    chat_id = uuid.uuid4().hex
    async with aiohttp.ClientSession(file_server.url) as http:
        await create(http, make_chat(app="fail-app"))  # makes the chats/ folder
        with BrokenFolder(file_server.data_dir / "blobs"):
            status, body = await call(
                http, "POST", "/api/chats", json={"chat": make_chat(chat_id, app="fail-app")}
            )
        assert (status, body) == STORAGE_UNAVAILABLE
        # The row was undone: the id is free and the app's count did not grow.
        status, chats = await call(
            http, "GET", "/api/chats?app=fail-app", headers={"x-admin-key": ADMIN_KEY}
        )
        assert len(chats) == 1
        assert await create(http, make_chat(chat_id, app="fail-app")) == chat_id


async def test_failed_blob_write_on_update_is_503_and_keeps_the_previous_chat(file_server):
    chat_id = uuid.uuid4().hex
    async with aiohttp.ClientSession(file_server.url) as http:
        await create(http, make_chat(chat_id, model="before", messages=["before"], usage=(1, 1, 1)))
        _, before = await call(http, "GET", f"/api/chats/{chat_id}")
        update = make_chat(chat_id, model="after", messages=["after"], usage=(2, 2, 2))
        with BrokenFolder(file_server.data_dir / "blobs"):
            status, body = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update})
        assert (status, body) == STORAGE_UNAVAILABLE
        assert await call(http, "GET", f"/api/chats/{chat_id}") == (200, before)


@pytest.fixture
def own_seaweed(tmp_path) -> Iterator[SeaweedFS]:
    weed = SeaweedFS(tmp_path / "weed").start()
    yield weed
    weed.stop()


async def test_s3_down_answers_503_and_nothing_saved_is_lost(own_seaweed, tmp_path):
    bucket = own_seaweed.create_bucket()
    server = QPServer(
        tmp_path / "qp", {"ADMIN_KEY": ADMIN_KEY, **own_seaweed.server_env(bucket)}
    ).start()
    chat_id = uuid.uuid4().hex
    try:
        async with aiohttp.ClientSession(server.url) as http:
            await create(http, make_chat(chat_id, app="s3-app", model="before", messages=["kept"]))
            _, before = await call(http, "GET", f"/api/chats/{chat_id}")

            own_seaweed.stop()
            started = time.monotonic()
            update = make_chat(chat_id, app="s3-app", model="after", messages=["lost?"])
            assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update}) == (
                STORAGE_UNAVAILABLE
            )
            new_chat = make_chat("never-made", app="s3-app")
            assert await call(http, "POST", "/api/chats", json={"chat": new_chat}) == (
                STORAGE_UNAVAILABLE
            )
            assert await call(http, "GET", f"/api/chats/{chat_id}") == STORAGE_UNAVAILABLE
            assert (
                await call(http, "GET", "/api/chats?app=s3-app", headers={"x-admin-key": ADMIN_KEY})
                == STORAGE_UNAVAILABLE
            )
            assert time.monotonic() - started < 30, "a store that is down must answer promptly"

            own_seaweed.start()
            assert await call(http, "GET", f"/api/chats/{chat_id}") == (200, before)
            assert await call(http, "GET", "/api/chats/never-made") == (
                404,
                {"error": "Chat not found"},
            )
            assert await create(http, make_chat("never-made", app="s3-app")) == "never-made"
    finally:
        server.stop()
    assert "Traceback" not in server.log()


async def test_a_stalled_s3_answers_503_in_time_and_releases_the_chat(own_seaweed, tmp_path):
    bucket = own_seaweed.create_bucket()
    env = {"ADMIN_KEY": ADMIN_KEY, "QP_S3_TIMEOUT": "2", **own_seaweed.server_env(bucket)}
    server = QPServer(tmp_path / "qp", env).start()
    chat_id = uuid.uuid4().hex
    # A client that would wait forever is what this test must not do itself.
    patience = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(server.url, timeout=patience) as http:
            await create(http, make_chat(chat_id, app="stall", model="before", messages=["kept"]))
            _, before = await call(http, "GET", f"/api/chats/{chat_id}")

            own_seaweed.process.send_signal(signal.SIGSTOP)  # accepts, never answers
            try:
                update = make_chat(chat_id, app="stall", model="after", messages=["big" * 400_000])
                for method, path, body in (
                    ("PUT", f"/api/chats/{chat_id}", {"chat": update}),
                    ("POST", "/api/chats", {"chat": make_chat("stalled-new", app="stall")}),
                ):
                    started = time.monotonic()
                    assert await call(http, method, path, json=body) == STORAGE_UNAVAILABLE
                    assert time.monotonic() - started < 2 + 3
                # The chat's lock was let go: a read answers (503: the store does not).
                started = time.monotonic()
                assert await call(http, "GET", f"/api/chats/{chat_id}") == STORAGE_UNAVAILABLE
                assert time.monotonic() - started < 2 + 3
                assert await call(http, "GET", "/healthz") == unhealthy(storage="unavailable")
            finally:
                own_seaweed.process.send_signal(signal.SIGCONT)
            log = server.log()
            assert "PUT /api/chats/{chat_id}: Storage: put chats/" in log
            assert ": no answer in time\n" in log

            # The SQL changes were undone: the chat as it was, the new one never made.
            for _ in range(50):
                answer = await call(http, "GET", f"/api/chats/{chat_id}")
                if answer[0] == 200:
                    break
                await asyncio.sleep(0.2)
            assert answer == (200, before)
            assert await call(http, "GET", "/api/chats/stalled-new") == (
                404,
                {"error": "Chat not found"},
            )
            assert await create(http, make_chat("stalled-new", app="stall")) == "stalled-new"
    finally:
        server.stop()
    assert "Traceback" not in server.log()
