"""PostgreSQL as the database (QP_DATABASE=postgresql://...): how the setting is read, the
one-line refusals at start-up, one owner per database, migrations two processes may run at
once, and the operators' tools beside a live server. The chats, completion and protection
behaviour itself runs on PostgreSQL in their own modules (marked `on_both_databases`)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from qp.config import ConfigError, load_config
from qp.storage.postgres import OWNER_LOCK, translate
from qp.storage.postgres_schema import SCHEMA_VERSION, migrate
from tests.helpers import ADMIN_KEY, call, create, make_chat, run_qp
from tests.processes import PostgresServer, QPServer, free_ports, run_server_once


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one line a refused start-up printed (and nothing else: no traceback)."""
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert PostgresServer.PASSWORD not in result.stderr
    return lines[0]


# --- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "path", "url"),
    [
        (None, Path("d/qp.sqlite3"), None),
        ("elsewhere/x.sqlite3", Path("elsewhere/x.sqlite3"), None),
        ("sqlite:///data/qp.sqlite3", Path("data/qp.sqlite3"), None),
        ("sqlite:////var/lib/qp/qp.sqlite3", Path("/var/lib/qp/qp.sqlite3"), None),
        ("postgresql://qp:pw@db.internal:5432/qp", Path("d/qp.sqlite3"), "postgresql://qp:pw@db.internal:5432/qp"),
        ("postgres://qp@/qp?host=/run/postgresql", Path("d/qp.sqlite3"), "postgres://qp@/qp?host=/run/postgresql"),
    ],
)  # fmt: skip
def test_qp_database_names_sqlite_or_postgresql(value, path, url):
    env = {"QP_DATA_DIR": "d", **({"QP_DATABASE": value} if value else {})}
    config = load_config(env)
    assert (config.database_path, config.postgres_url) == (path, url)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "mysql://u:secret@h/db",
            "QP_DATABASE mysql://u:********@h/db: not a file path, sqlite:///PATH or"
            " postgresql:// URL",
        ),
        ("sqlite://relative", "QP_DATABASE sqlite://relative: a SQLite URL is sqlite:///PATH"),
    ],
)  # fmt: skip
def test_a_database_url_of_another_kind_is_refused(value, message):
    with pytest.raises(ConfigError) as refused:
        load_config({"QP_DATABASE": value})
    assert str(refused.value) == message


def test_check_config_masks_the_database_password(tmp_path):
    done = run_server_once(
        tmp_path / "data", "--check-config", QP_DATABASE="postgresql://qp:hunter2@db:5432/qp"
    )
    assert done.returncode == 0, done.stderr
    assert '# database = "postgresql://qp:********@db:5432/qp"' in done.stdout
    assert "hunter2" not in done.stdout


def test_placeholders_become_numbered_and_quoted_text_is_left_alone():
    assert translate("SELECT ? WHERE a = ? AND b = '?'") == (
        "SELECT $1 WHERE a = $2 AND b = '?'",
        (),
    )
    assert translate("WHERE x >= :since AND (CAST(:since AS TEXT) IS NULL OR y = :app::text)") == (
        "WHERE x >= $1 AND (CAST($1 AS TEXT) IS NULL OR y = $2::text)",
        ("since", "app"),
    )


# --- start-up ---------------------------------------------------------------------------


def test_a_wrong_password_stops_start_up_with_one_line(tmp_path, postgres):
    url = postgres.create_database().replace(PostgresServer.PASSWORD, "wrong-password")
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE=url))
    assert line.startswith("qp-server: QP_DATABASE postgresql://qp:********@127.0.0.1:")
    assert 'password authentication failed for user "qp"' in line
    assert "wrong-password" not in line


def test_an_unreachable_server_stops_start_up_with_one_line(tmp_path):
    (port,) = free_ports()
    url = f"postgresql://qp:{PostgresServer.PASSWORD}@127.0.0.1:{port}/qp"
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE=url))
    assert line.startswith(f"qp-server: QP_DATABASE postgresql://qp:********@127.0.0.1:{port}/qp:")
    assert "Connect call failed" in line or "Connection refused" in line, line


def test_a_database_that_is_not_there_stops_start_up_with_one_line(tmp_path, postgres):
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE=postgres.url("nothing_here")))
    assert 'database "nothing_here" does not exist' in line


def test_a_malformed_url_stops_start_up_with_one_line(tmp_path):
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE="postgresql://qp@h:port/db"))
    assert line.startswith("qp-server: QP_DATABASE postgresql://qp@h:port/db: "), line


# --- one owner, and the operators' tools beside it --------------------------------------


async def test_a_second_server_on_the_same_database_is_refused(tmp_path, postgres):
    url = postgres.create_database()
    shared = {"QP_DATABASE": url, "QP_STORAGE": f"file://{tmp_path / 'blobs'}"}
    first = QPServer(tmp_path / "one", {**shared, "ADMIN_KEY": ADMIN_KEY}).start()
    try:
        # (A blob folder of its own: the shared one's lock would refuse it first.)
        line = refusal(run_server_once(tmp_path / "two", QP_DATABASE=url))
        assert "another qp-server holds it" in line
        # The first goes on serving, and the operators' tools work beside it.
        async with aiohttp.ClientSession(first.url) as http:
            chat_id = await create(http, make_chat(app="owned"))
            assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200
        listed = await asyncio.to_thread(
            run_qp, tmp_path / "tools", "chats", "list", "--app", "owned", **shared
        )
        assert listed.returncode == 0, listed.stderr
        assert chat_id in listed.stdout
        checked = await asyncio.to_thread(run_qp, tmp_path / "tools", "check", **shared)
        assert checked.returncode == 0, checked.stderr
        assert "may be serving this PostgreSQL database" in checked.stderr
    finally:
        first.stop()
    # Stopped, it lets the next one have the database, chats and all.
    again = QPServer(tmp_path / "three", shared).start()
    try:
        async with aiohttp.ClientSession(again.url) as http:
            assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200
    finally:
        again.stop()


async def test_two_processes_migrating_at_once_make_the_schema_once(postgres):
    url = postgres.create_database()
    connections = [await asyncpg.connect(url) for _ in range(2)]
    try:
        await asyncio.gather(*(migrate(conn) for conn in connections))
        await migrate(connections[0])  # current: nothing to do
        tables = await connections[0].fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        versions = await connections[0].fetch("SELECT version FROM qp_schema")
    finally:
        for conn in connections:
            await conn.close()
    assert [row[0] for row in tables] == [
        "blocks",
        "chats",
        "completions",
        "prices",
        "qp_schema",
        "settings",
    ]
    assert [row[0] for row in versions] == [SCHEMA_VERSION]


async def test_a_database_from_a_newer_server_is_refused(tmp_path, postgres):
    url = postgres.create_database()
    postgres.psql(
        "CREATE TABLE qp_schema (version INTEGER NOT NULL); INSERT INTO qp_schema VALUES (99)",
        url.rsplit("/", 1)[1],
    )
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE=url))
    assert "SchemaTooNew: schema version 99 is newer than this server's (1)" in line


async def test_losing_the_ownership_lock_refuses_writes_until_a_restart(start_server, postgres):
    url = postgres.create_database()
    server = await start_server(QP_DATABASE=url)
    chat_id = await create(server.client, make_chat(app="lost"))
    # PostgreSQL ends the session that holds the server's lock (a restart, a failover).
    postgres.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
        f" AND objid = {OWNER_LOCK & 0xFFFFFFFF}",
        url.rsplit("/", 1)[1],
    )
    for _ in range(50):
        status, health = await call(server.client, "GET", "/healthz")
        if status == 503:
            break
        await asyncio.sleep(0.1)
    assert (status, health["checks"]["database"]) == (503, "unowned")
    chat = make_chat(chat_id, app="lost", messages=["changed"])
    assert await call(server.client, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}) == (
        503,
        {"error": "Storage unavailable"},
    )
    assert (await call(server.client, "GET", f"/api/chats/{chat_id}"))[0] == 200  # reads go on
