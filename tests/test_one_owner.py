"""One owner per database: a second server refuses to start, `check --repair` beside a live
server touches nothing a write may still commit, and no acknowledged write is ever lost."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.helpers import (
    ADMIN_KEY,
    WriteLoad,
    call,
    create,
    make_chat,
    run_qp,
    unhealthy,
    wait_for_log,
)
from tests.processes import QPServer, run_server_once

ROUNDS = 3


def refusal_line(server) -> str:
    database = server.data_dir / "qp.sqlite3"
    return f"qp-server: another qp-server (pid {server.process.pid}) is serving {database}\n"


async def under_write_load(server, attempt) -> None:
    """Run `attempt()` ROUNDS times while clients create and update chats; then every write
    the server acknowledged reads back, and a check after a clean stop finds nothing."""
    async with WriteLoad(server.url) as load:
        for _ in range(ROUNDS):
            await asyncio.sleep(0.3)
            await asyncio.to_thread(attempt)
    assert load.refused == []
    async with aiohttp.ClientSession(server.url) as http:
        await load.check_all_read_back(http)
    server.stop()
    after = run_qp(server.data_dir, "check", "--min-age", "0")
    assert (after.returncode, after.stdout) == (0, "nothing to repair\n")


@pytest.mark.parametrize("port", ["another", "the same"])
async def test_a_second_server_on_the_same_data_refuses_and_loses_nothing(qp_server, port):
    server = qp_server(QP_MAX_CHATS_PER_APP="100000")

    def start_a_second_server() -> None:
        args = ["--port", "0" if port == "another" else str(server.port)]
        second = run_server_once(server.data_dir, *args)
        assert (second.returncode, second.stderr) == (1, refusal_line(server))

    await under_write_load(server, start_a_second_server)


@pytest.mark.parametrize("min_age", ["0", "60"])
async def test_check_repair_beside_a_live_server_under_load_loses_nothing(qp_server, min_age):
    server = qp_server(QP_MAX_CHATS_PER_APP="100000")

    def repair() -> None:
        repaired = run_qp(server.data_dir, "check", "--repair", "--min-age", min_age)
        assert repaired.returncode == 0, repaired.stderr
        # Garbage of the server's own commits may be deleted too; nothing is found.
        assert repaired.stdout.splitlines()[0] == "nothing to repair"

    await under_write_load(server, repair)


async def test_check_refuses_to_repair_another_blob_store_than_the_live_servers(
    qp_server, tmp_path
):
    server = qp_server()
    result = run_qp(
        server.data_dir, "check", "--repair", QP_STORAGE=f"file://{tmp_path / 'elsewhere'}"
    )
    assert result.returncode == 1
    assert "serves this database with QP_STORAGE=" in result.stderr
    assert "run with the server's environment" in result.stderr


async def test_a_removed_lock_file_is_claimed_again(qp_server):
    server = qp_server()
    lock = server.data_dir / "qp.sqlite3.lock"
    lock.unlink()
    await wait_for_log(server, f"lock file {lock} was removed or replaced; claimed again")
    second = await asyncio.to_thread(run_server_once, server.data_dir, "--port", "0")
    assert (second.returncode, second.stderr) == (1, refusal_line(server))
    async with aiohttp.ClientSession(server.url) as http:
        assert (await call(http, "POST", "/api/chats", json={"chat": make_chat()}))[0] == 200


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_server_whose_lock_file_another_server_took_refuses_every_write(
    qp_server, tmp_path, request, database
):
    on_postgres = database == "postgres"
    env = (
        {"QP_DATABASE": request.getfixturevalue("postgres").create_database()}
        if on_postgres
        else {}
    )
    old = qp_server(**env)
    # On PostgreSQL the one lock file is the file blob folder's.
    lock = old.data_dir / ("blobs/.qp-server.lock" if on_postgres else "qp.sqlite3.lock")
    async with aiohttp.ClientSession(old.url) as http:
        kept = await create(http, make_chat(app="taken", messages=["kept"]))
        _, before = await call(http, "GET", f"/api/chats/{kept}")
        # Stopped, the old server cannot claim the file again before the newcomer does.
        old.signal(signal.SIGSTOP)
        try:
            lock.unlink()
            # On SQLite the newcomer shares the database only (the blob folder is locked).
            own = tmp_path / "newcomer"
            blobs = {} if on_postgres else {"QP_STORAGE": f"file://{own / 'blobs'}"}
            own.mkdir()
            newcomer = QPServer(old.data_dir, {**old.env, **blobs}, log_dir=own).start()
        finally:
            old.signal(signal.SIGCONT)
        try:
            await wait_for_log(
                old,
                f"{lock} was taken by another process:"
                " writes are refused until the server is restarted",
            )
            new = make_chat(app="taken")
            assert await call(http, "POST", "/api/chats", json={"chat": new}) == (
                503,
                {"error": "Storage unavailable"},
            )
            assert await call(http, "GET", f"/api/chats/{kept}") == (200, before)
            assert await call(http, "GET", "/healthz") == unhealthy(database="taken-over")
        finally:
            newcomer.stop()
    assert "Traceback" not in old.log()


async def test_a_second_server_on_the_same_blob_folder_refuses(qp_server, tmp_path):
    server = qp_server()
    blobs = server.data_dir / "blobs"
    second = run_server_once(tmp_path / "other", "--port", "0", QP_STORAGE=f"file://{blobs}")
    assert (second.returncode, second.stderr) == (
        1,
        f"qp-server: another qp-server (pid {server.process.pid}) is serving {blobs}\n",
    )


async def test_a_crashed_owner_leaves_no_claim_behind(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        chat_id = await create(http, make_chat(app="crash-claim"))
    server.kill()
    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        status, chat = await call(
            http, "GET", "/api/chats?app=crash-claim", headers={"x-admin-key": ADMIN_KEY}
        )
        assert (status, [c["chatId"] for c in chat]) == (200, [chat_id])
