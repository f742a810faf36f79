"""When the disk fills, turns read-only, or the database file is deleted or damaged under a
running server: honest 503s and /healthz, nothing saved lost, deletes still working."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from qp.config import MAX_MEGABYTES
from tests.helpers import ADMIN_KEY, call, create, make_chat, run_qp, unhealthy, wait_for_log
from tests.processes import Ext4Image, QPServer, SmallDisk

STORAGE_UNAVAILABLE = (503, {"error": "Storage unavailable"})
INSUFFICIENT_STORAGE = (507, {"error": "Insufficient storage"})
ADMIN = {"x-admin-key": ADMIN_KEY}


@pytest.fixture
def disk(tmp_path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "disk", 32).mount()
    yield small
    small.unmount()


@pytest.fixture
def disk_server(disk, tmp_path) -> Iterator[QPServer]:
    """A server whose database and blobs live on the small disk, with no free-space floor:
    the disk really fills. Its log stays off that disk."""
    server = QPServer(
        disk.path / "data",
        {"ADMIN_KEY": ADMIN_KEY, "QP_MIN_FREE_MB": "0"},
        log_dir=tmp_path,
    )
    server.start()
    yield server
    server.stop()
    assert "Traceback" not in server.log()


async def wait_for(http: aiohttp.ClientSession, path: str, expected: tuple, seconds: float = 5):
    """Poll until `path` answers `expected`; the last answer otherwise."""
    answer = None
    for _ in range(int(seconds / 0.1)):
        answer = await call(http, "GET", path)
        if answer == expected:
            break
        await asyncio.sleep(0.1)
    return answer


async def test_a_full_disk_answers_503_keeps_what_was_saved_and_deletes_still_work(
    disk, disk_server
):
    async with aiohttp.ClientSession(disk_server.url) as http:
        kept = await create(http, make_chat(app="full", model="before", messages=["kept"]))
        by_admin = await create(http, make_chat(app="full"))
        by_tool = await create(http, make_chat(app="full"))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
        disk.fill()

        new = make_chat("never-stored", app="full")
        assert await call(http, "POST", "/api/chats", json={"chat": new}) == STORAGE_UNAVAILABLE
        changed = make_chat(kept, app="full", model="after", messages=["lost?"])
        assert (
            await call(http, "PUT", f"/api/chats/{kept}", json={"chat": changed})
            == STORAGE_UNAVAILABLE
        )
        assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
        assert await call(http, "GET", "/api/chats/never-stored") == (
            404,
            {"error": "Chat not found"},
        )
        assert await call(http, "GET", "/healthz") == unhealthy(storage="full")
        await wait_for_log(disk_server, "POST /api/chats: Database: database or disk is full")

        # The operator makes room through qp itself: the admin route, then the tool.
        assert await call(http, "DELETE", f"/api/chats/{by_admin}", headers=ADMIN) == (
            200,
            {"success": True},
        )
        assert (await call(http, "GET", f"/api/chats/{by_admin}"))[0] == 404
        disk.fill()
        deleted = await asyncio.to_thread(run_qp, disk_server.data_dir, "chats", "delete", by_tool)
        assert deleted.returncode == 0, deleted.stderr
        assert (await wait_for(http, f"/api/chats/{by_tool}", (404, {"error": "Chat not found"})))[
            0
        ] == 404
        await wait_for_log(disk_server, "the disk is full: gave back 1024 KiB of the reserve")
        checked = await asyncio.to_thread(run_qp, disk_server.data_dir, "check")
        assert (checked.returncode, checked.stdout) == (0, "nothing to repair\n"), checked.stderr

        disk.empty()
        assert await call(http, "POST", "/api/chats", json={"chat": new}) == (
            200,
            {"chatId": "never-stored"},
        )
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
        assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)


@pytest.mark.parametrize("reserve", ["kept", "gone"])
async def test_a_restart_on_a_full_disk_serves_reads_and_refuses_writes(disk, disk_server, reserve):
    async with aiohttp.ClientSession(disk_server.url) as http:
        kept = await create(http, make_chat(app="restart", messages=["kept"]))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
    disk_server.stop()
    if reserve == "gone":
        (disk_server.data_dir / "qp.sqlite3.reserve").unlink()
    disk.fill()

    disk_server.start()
    async with aiohttp.ClientSession(disk_server.url) as http:
        assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
        new = make_chat("after-restart", app="restart")
        assert await call(http, "POST", "/api/chats", json={"chat": new}) == STORAGE_UNAVAILABLE
        assert await call(http, "GET", "/healthz") == unhealthy(storage="full")
    read_only = "the disk is full: the database is open read-only; restart with room to write"
    assert (read_only in disk_server.log()) == (reserve == "gone")
    checked = await asyncio.to_thread(run_qp, disk_server.data_dir, "check")
    assert "Traceback" not in checked.stderr
    assert (checked.returncode, checked.stdout) == (0, "nothing to repair\n"), checked.stderr

    disk_server.stop()
    disk.empty()
    disk_server.start()
    async with aiohttp.ClientSession(disk_server.url) as http:
        assert (await call(http, "POST", "/api/chats", json={"chat": new}))[0] == 200
        assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)


async def test_below_the_free_space_floor_new_chats_and_updates_get_507(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="floor"))
        doomed = await create(http, make_chat(app="floor"))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
    server.stop()
    # The highest floor there is, 1 TiB: more than the test's disk has free.
    assert shutil.disk_usage(server.data_dir).free < MAX_MEGABYTES * 1024 * 1024
    server.env["QP_MIN_FREE_MB"] = str(MAX_MEGABYTES)
    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        new = make_chat(app="floor")
        assert await call(http, "POST", "/api/chats", json={"chat": new}) == INSUFFICIENT_STORAGE
        update = make_chat(kept, app="floor", model="changed")
        assert (
            await call(http, "PUT", f"/api/chats/{kept}", json={"chat": update})
            == INSUFFICIENT_STORAGE
        )
        assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
        assert await call(http, "DELETE", f"/api/chats/{doomed}", headers=ADMIN) == (
            200,
            {"success": True},
        )
        assert await call(http, "GET", "/healthz") == unhealthy(storage="full")
    # A 507 is the operator's floor, not a failure: the access log only.
    assert [
        line for line in server.log().splitlines() if " WARNING " in line or " ERROR " in line
    ] == []


def chattr(flag: str, *paths: Path) -> None:
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr is not permitted here: {done.stderr.strip()}")


async def test_read_only_blob_files_answer_503_and_the_server_lives_on(qp_server):
    server = qp_server()
    chats = server.data_dir / "blobs" / "chats"
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="ro", messages=["kept"]))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
        locked = [chats, *chats.iterdir(), server.data_dir / "blobs"]
        chattr("+i", *locked)
        try:
            update = make_chat(kept, app="ro", messages=["changed"])
            assert (
                await call(http, "PUT", f"/api/chats/{kept}", json={"chat": update})
                == STORAGE_UNAVAILABLE
            )
            new = make_chat(app="ro")
            assert await call(http, "POST", "/api/chats", json={"chat": new}) == STORAGE_UNAVAILABLE
            assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
            assert await call(http, "GET", "/healthz") == unhealthy(storage="read-only")
            log = server.log()
            assert "PUT /api/chats/{chat_id}: Storage: write chats/" in log
            assert ": Operation not permitted\n" in log
        finally:
            chattr("-i", *locked)
        assert (await call(http, "POST", "/api/chats", json={"chat": new}))[0] == 200
        await asyncio.sleep(5)  # /healthz tries a write again at most every 5 s
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


async def writes_refused(http: aiohttp.ClientSession, kept: str, app: str) -> dict:
    """A new chat in `app` and an update of chat `kept` both get 503: the update tried."""
    new = make_chat(app=app)
    assert await call(http, "POST", "/api/chats", json={"chat": new}) == STORAGE_UNAVAILABLE
    update = make_chat(kept, app=app, messages=["changed"])
    assert (
        await call(http, "PUT", f"/api/chats/{kept}", json={"chat": update}) == STORAGE_UNAVAILABLE
    )
    return update


async def test_a_read_only_database_file_answers_503_and_healthz_says_so(qp_server):
    """SQLite's writes to a file made read-only under it fail with a bare I/O error."""
    server = qp_server()
    database = server.data_dir / "qp.sqlite3"
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="ro-db", messages=["kept"]))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
        locked = [database, database.with_name("qp.sqlite3-wal")]
        chattr("+i", *locked)
        try:
            update = await writes_refused(http, kept, "ro-db")
            assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
            assert await call(http, "GET", "/healthz") == unhealthy(storage="read-only")
            assert "POST /api/chats: Database: disk I/O error\n" in server.log()
        finally:
            chattr("-i", *locked)
        assert await call(http, "PUT", f"/api/chats/{kept}", json={"chat": update}) == (
            200,
            {"success": True},
        )
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
    server.stop()
    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        status, chat = await call(http, "GET", f"/api/chats/{kept}")
    assert (status, chat["messages"]) == (200, ["changed"])
    assert "Traceback" not in server.log()


async def test_a_filesystem_ext4_turned_read_only_answers_503_and_healthz_says_so(tmp_path):
    """ext4 makes a filesystem read-only on an error it finds (errors=remount-ro), under
    files open for writing, which it still calls writable. The blobs are elsewhere: what
    /healthz says here comes from the database's failure alone."""
    image = Ext4Image(tmp_path / "ext4").mount()
    try:
        env = {"QP_MIN_FREE_MB": "16", "QP_STORAGE": f"file://{tmp_path / 'blobs'}"}
        server = QPServer(image.path / "qp", env, log_dir=tmp_path).start()
        try:
            async with aiohttp.ClientSession(server.url) as http:
                kept = await create(http, make_chat(app="ro-fs", messages=["kept"]))
                _, before = await call(http, "GET", f"/api/chats/{kept}")
                image.fail()
                await writes_refused(http, kept, "ro-fs")
                assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
                assert await call(http, "GET", "/healthz") == unhealthy(storage="read-only")
        finally:
            assert server.stop() == 0
        assert "POST /api/chats: Database: disk I/O error\n" in server.log()
        assert "Traceback" not in server.log()
    finally:
        image.unmount()


def damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "replaced":
        shutil.copy(path, path.with_name("copy"))
        os.replace(path.with_name("copy"), path)
    elif how == "truncated":
        os.truncate(path, 0)
    else:  # the first page zeroed
        with open(path, "r+b") as file:
            file.write(b"\0" * 4096)


@pytest.mark.parametrize(
    ("how", "state"),
    [
        ("deleted", "deleted"),
        ("replaced", "replaced"),
        ("truncated", "damaged"),
        ("zeroed", "damaged"),
    ],
)
async def test_a_database_file_damaged_under_the_server_takes_no_more_writes(qp_server, how, state):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="damaged", messages=["kept"]))
        damage(server.data_dir / "qp.sqlite3", how)
        # At once, before the server's once-a-second look: the write's own check refuses it.
        await writes_refused(http, kept, "damaged")
        assert await call(http, "GET", "/healthz") == unhealthy(database=state)
    assert server.process.poll() is None
    log = server.log()
    assert (
        f"the database file {server.data_dir / 'qp.sqlite3'} was {state} while the server ran:"
        " writes are refused until it is restored and the server restarted"
    ) in log
    assert "Traceback" not in log


async def test_a_damaged_database_file_is_noticed_without_any_write(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
        damage(server.data_dir / "qp.sqlite3", "zeroed")
        assert await wait_for(http, "/healthz", unhealthy(database="damaged"), 3) == unhealthy(
            database="damaged"
        )
