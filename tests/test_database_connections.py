"""PostgreSQL connections: the pools' sizes are configuration; a server PostgreSQL refuses
more connections answers 503 and says why; the process lease and the listening connection
never wait behind request traffic."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import asyncpg
import pytest

from qp.config import ConfigError, load_config
from tests.helpers import call, make_chat, wait_for_log
from tests.processes import PostgresServer, QPServer, run_server_once

STORAGE_UNAVAILABLE = {"error": "Storage unavailable"}


def test_the_pool_sizes_are_configuration_with_bounds():
    config = load_config({"QP_DATABASE_POOL": "7", "QP_DATABASE_QUICK_POOL": "2"})
    assert (config.database_pool, config.database_quick_pool) == (7, 2)
    assert (load_config({}).database_pool, load_config({}).database_quick_pool) == (20, 5)
    for name in ("QP_DATABASE_POOL", "QP_DATABASE_QUICK_POOL"):
        for raw in ("0", "1001", "nan"):
            with pytest.raises(ConfigError) as refused:
                load_config({name: raw})
            assert (
                str(refused.value) == f"{name} must be a whole number from 1 to 1000, got {raw!r}"
            )


def test_check_config_shows_the_pool_sizes(tmp_path):
    result = run_server_once(tmp_path / "data", "--check-config", QP_DATABASE_POOL="8")
    assert result.returncode == 0, result.stderr
    assert "# database_pool = 8\n# database_quick_pool = 5\n" in result.stdout


def limited_role(postgres: PostgresServer, limit: int) -> tuple[str, str]:
    """A database owned by a role of its own that may hold `limit` connections: its URL
    for that role, and its name."""
    database = postgres.create_database().rsplit("/", 1)[1]
    role = f"few_{uuid.uuid4().hex[:8]}"
    postgres.psql(
        f"CREATE ROLE {role} LOGIN PASSWORD 'few-secret' CONNECTION LIMIT {limit};"
        f" ALTER DATABASE {database} OWNER TO {role}"
    )
    return f"postgresql://{role}:few-secret@127.0.0.1:{postgres.port}/{database}", database


def test_start_up_refused_for_too_many_connections_says_why_in_one_line(tmp_path, postgres):
    url, _ = limited_role(postgres, 2)
    result = run_server_once(tmp_path / "data", "--port", "0", QP_DATABASE=url)
    assert result.returncode == 1
    assert "few-secret" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("qp-server: QP_DATABASE postgresql://few_")
    assert "TooManyConnectionsError: too many connections for role" in line
    assert line.endswith(
        "(PostgreSQL's max_connections or the role's CONNECTION LIMIT is reached; each server"
        " opens up to QP_DATABASE_POOL + QP_DATABASE_QUICK_POOL + 2 connections)"
    )


async def held_lock(postgres: PostgresServer, database: str) -> asyncpg.Connection:
    """A session (of the cluster's owner) holding the chats table locked, in a transaction."""
    conn = await asyncpg.connect(postgres.url(database))
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE chats IN ACCESS EXCLUSIVE MODE")
    return conn


async def waiting_on_the_lock(monitor: asyncpg.Connection, count: int) -> None:
    query = (
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    while await monitor.fetchval(query) < count:
        assert time.monotonic() < deadline, f"fewer than {count} sessions wait on the lock"
        await asyncio.sleep(0.05)


async def test_a_pool_growing_past_the_connection_limit_is_503_and_logged(tmp_path, postgres):
    # Start-up takes four: the listener, the lease's, one of each pool.
    url, database = limited_role(postgres, 4)
    server = QPServer(tmp_path / "qp", {"QP_DATABASE": url, "QP_DATABASE_POOL": "5"}).start()
    lock = await held_lock(postgres, database)
    monitor = await asyncpg.connect(postgres.url(database))
    try:
        async with aiohttp.ClientSession(server.url) as http:
            # One read holds the pool's only connection, waiting on the lock; the next needs
            # a fifth connection, which PostgreSQL refuses.
            waiting = asyncio.ensure_future(call(http, "GET", "/api/chats/held-one"))
            await waiting_on_the_lock(monitor, 1)
            assert await call(http, "GET", "/api/chats/another") == (503, STORAGE_UNAVAILABLE)
            await lock.execute("COMMIT")
            assert (await waiting)[0] == 404
        await wait_for_log(server, "TooManyConnectionsError: too many connections for role")
    finally:
        await lock.close()
        await monitor.close()
        server.stop()
    log = server.log()
    refused = [line for line in log.splitlines() if "TooManyConnectionsError" in line]
    assert any("GET /api/chats/{chat_id}: Database: TooManyConnectionsError" in x for x in refused)
    assert all("the role's CONNECTION LIMIT is reached" in line for line in refused)
    assert "few-secret" not in log and "Traceback" not in log and " 500 " not in log


async def test_the_lease_renews_and_changes_are_heard_while_requests_fill_the_pool(
    tmp_path, postgres
):
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    server = QPServer(
        tmp_path / "qp",
        {"QP_DATABASE": url, "QP_DATABASE_POOL": "2", "QP_WRITE_LEASE_SECONDS": "5"},
    ).start()
    monitor = await asyncpg.connect(url)
    lock = None
    try:
        async with aiohttp.ClientSession(server.url) as http:
            status, body = await call(
                http, "POST", "/api/chats", json={"chat": make_chat(model="first")}
            )
            assert status == 200
            chat_id = body["chatId"]
            assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "first"
            # A process alone serves its cache unchecked: only what it hears changes it.
            lock = await held_lock(postgres, database)
            reads = [
                asyncio.ensure_future(call(http, "GET", f"/api/chats/waiting-{n}"))
                for n in range(8)
            ]
            await waiting_on_the_lock(monitor, 2)  # the whole pool, and six reads queued
            await lock.execute("UPDATE chats SET model = 'second' WHERE chat_id = $1", chat_id)
            await monitor.execute("SELECT pg_notify('qp_changes', $1)", f"chat:{chat_id}")
            # Past the lease (and short of the pool's 10 s wait for a connection), the pool
            # full all along: the lease never lapses.
            expiries = []
            until = time.monotonic() + 9
            while time.monotonic() < until:
                expires_at = await monitor.fetchval("SELECT MAX(expires_at) FROM write_leases")
                assert expires_at > time.time(), "the lease lapsed behind the requests"
                expiries.append(expires_at)
                await asyncio.sleep(0.25)
            assert expiries[-1] > expiries[0] + 6
            await lock.execute("COMMIT")
            await asyncio.gather(*reads)
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            assert (status, chat["model"]) == (200, "second")
    finally:
        if lock is not None:
            await lock.close()
        await monitor.close()
        server.stop()
    assert "Traceback" not in server.log()
    assert "cannot renew the process lease" not in server.log()


async def test_a_lost_listener_reconnects_while_requests_fill_the_pool(tmp_path, postgres):
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    server = QPServer(tmp_path / "qp", {"QP_DATABASE": url, "QP_DATABASE_POOL": "2"}).start()
    monitor = await asyncpg.connect(url)
    lock = await held_lock(postgres, database)
    listening = (
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
        " AND datname = current_database()"
    )
    try:
        async with aiohttp.ClientSession(server.url) as http:
            reads = [
                asyncio.ensure_future(call(http, "GET", f"/api/chats/waiting-{n}"))
                for n in range(8)
            ]
            await waiting_on_the_lock(monitor, 2)
            first = await monitor.fetchval(listening)
            await monitor.execute("SELECT pg_terminate_backend($1, 5000)", first)
            # It listens again within a few housekeeping rounds, the pool still full (the
            # pool's wait for a connection is 10 s).
            deadline = time.monotonic() + 7
            while (again := await monitor.fetchval(listening)) in (None, first):
                assert time.monotonic() < deadline, "no new listener while the pool was full"
                await asyncio.sleep(0.1)
            assert (
                await monitor.fetchval(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                == 2
            )
            await lock.execute("COMMIT")
            await asyncio.gather(*reads)
    finally:
        await lock.close()
        await monitor.close()
        server.stop()
    assert again != first
    assert "listening for other processes' changes to" in server.log()
