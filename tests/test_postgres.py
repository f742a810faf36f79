"""PostgreSQL as the database (QP_DATABASE=postgresql://...): how the setting is read, the
one-line refusals at start-up, migrations two processes may run at once, the connection
that hears other processes' changes, and the operators' tools beside a live server. The
chats, completion and protection behaviour itself runs on PostgreSQL in their own modules
(marked `on_both_databases`); several servers together are in test_cluster.py."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from qp.config import ConfigError, load_config
from qp.storage.batches import BatchWriter
from qp.storage.migrations import SCHEMA_VERSION, PostgresSchema, SchemaTooNew, migrate
from qp.storage.postgres import CHANGES, translate
from tests.helpers import (
    ADMIN_KEY,
    a_fresh_minute,
    call,
    completion_request,
    create,
    eventually,
    make_chat,
    old_postgres_schema,
    run_qp,
    wait_until,
)
from tests.processes import (
    ROOT,
    PostgresServer,
    QPServer,
    free_ports,
    run_server_once,
    schema_dump,
)


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


# --- the operators' tools beside a server -------------------------------------------------


async def test_the_tools_work_beside_a_running_server(tmp_path, postgres):
    url = postgres.create_database()
    shared = {"QP_DATABASE": url, "QP_STORAGE": f"file://{tmp_path / 'blobs'}"}
    server = QPServer(tmp_path / "one", {**shared, "ADMIN_KEY": ADMIN_KEY}).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            chat_id = await create(http, make_chat(app="beside"))
            assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200
        listed = await asyncio.to_thread(
            run_qp, tmp_path / "tools", "chats", "list", "--app", "beside", **shared
        )
        assert listed.returncode == 0, listed.stderr
        assert chat_id in listed.stdout
        checked = await asyncio.to_thread(run_qp, tmp_path / "tools", "check", **shared)
        assert (checked.returncode, checked.stdout) == (0, "nothing to repair\n"), checked.stderr
    finally:
        server.stop()


async def test_two_processes_migrating_at_once_make_the_schema_once(postgres):
    url = postgres.create_database()
    connections = [await asyncpg.connect(url) for _ in range(2)]
    try:
        await asyncio.gather(*(migrate(PostgresSchema(conn)) for conn in connections))
        await migrate(PostgresSchema(connections[0]))  # current: nothing to do
        tables = await connections[0].fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        versions = await connections[0].fetch("SELECT version FROM qp_schema")
    finally:
        for conn in connections:
            await conn.close()
    assert [row[0] for row in tables] == [
        "blocks",
        "budget_accounts",
        "budget_reservations",
        "chat_bytes",
        "chat_garbage",
        "chat_writes",
        "chats",
        "completions",
        "prices",
        "qp_schema",
        "rate_counts",
        "rate_refusals",
        "response_cache",
        "settings",
        "write_leases",
    ]
    assert [row[0] for row in versions] == [SCHEMA_VERSION]


async def test_the_count_of_bytes_stored_starts_from_the_rows_and_follows_every_change(postgres):
    url = postgres.create_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(old_postgres_schema(3))  # as old version 3 (before the count) left it
        insert = "INSERT INTO chats (chat_id, app, model, messages_bytes) VALUES ($1, 'a', 'm', $2)"
        await conn.executemany(insert, [("one", 100), ("two", 250), ("imported", None)])
        await migrate(PostgresSchema(conn))
        total = "SELECT SUM(bytes) FROM chat_bytes"
        assert (
            await conn.fetchval(total),
            await conn.fetchval("SELECT COUNT(*) FROM chat_bytes"),
        ) == (
            350,
            64,
        )
        await conn.execute("UPDATE chats SET messages_bytes = 40 WHERE chat_id = 'imported'")
        await conn.execute("UPDATE chats SET messages_bytes = 200 WHERE chat_id = 'two'")
        await conn.execute("DELETE FROM chats WHERE chat_id = 'one'")
        await conn.execute(insert, "three", 5)
        await conn.execute("UPDATE chats SET model = 'n'")
        await conn.execute("UPDATE chats SET messages_bytes = NULL WHERE chat_id = 'three'")
        assert await conn.fetchval(total) == 240
    finally:
        await conn.close()


async def test_a_database_from_a_newer_server_is_refused(tmp_path, postgres):
    url = postgres.create_database()
    postgres.psql(
        "CREATE TABLE qp_schema (version INTEGER NOT NULL); INSERT INTO qp_schema VALUES (99)",
        url.rsplit("/", 1)[1],
    )
    line = refusal(run_server_once(tmp_path / "data", QP_DATABASE=url))
    assert f"SchemaTooNew: schema version 99 is newer than this server's ({SCHEMA_VERSION})" in line


# Rows as each table first had them: table -> (PostgreSQL's old step that made it, columns,
# row).
OLD_ROWS: dict[str, tuple[int, tuple[str, ...], tuple]] = {
    "chats": (
        1,
        (
            "chat_id",
            "app",
            "model",
            "prompt_tokens",
            "estimated_cost",
            "updated_at",
            "messages_bytes",
        ),
        ("old-chat", "nwb", "m", 12, 0.5, "2025-01-02T00:00:00.000Z", 30),
    ),
    "completions": (
        1,
        ("started_at", "app", "model", "payer", "cost", "status", "outcome", "duration_ms"),
        ("2025-01-03T00:00:00.000Z", "nwb", "m", "server", 0.25, 200, "completed", 99),
    ),
    "settings": (1, ("name", "value"), ("ip_salt", "kept-salt")),
    "blocks": (
        1,
        ("client_hash", "blocked_at", "blocked_until"),
        ("ab" * 32, "2025-01-04T00:00:00.000Z", "2999-01-01T00:00:00.000Z"),
    ),
    "prices": (1, ("model", "prompt", "completion", "fetched_at"), ("m", 1e-6, 2e-6, "2025")),
    "write_leases": (2, ("owner", "expires_at"), ("process-a", 1.5)),
    "rate_counts": (
        2,
        ("client_hash", "rate_class", "minute", "minute_count", "hour", "hour_count"),
        ("cd" * 32, "chat", 60, 3, 1, 9),
    ),
    "rate_refusals": (2, ("client_hash", "refused_at"), ("cd" * 32, 2.5)),
    "budget_accounts": (
        2,
        ("kind", "name", "period", "period_start", "spent", "reserved"),
        ("app", "nwb", "day", 86400.0, 1.25, 0.5),
    ),
    "budget_reservations": (2, ("owner", "amount", "accounts"), ("process-a", 0.5, "[]")),
    "chat_writes": (3, ("rev", "chat_id", "started_at"), ("r1", "old-chat", 3.5)),
    "chat_garbage": (3, ("chat_id", "rev", "since"), ("old-chat", "r0", 4.5)),
}


@pytest.mark.parametrize("version", range(1, 7))
async def test_a_database_of_each_old_version_upgrades_to_the_new_schema_with_its_rows(
    postgres, version
):
    old, new = postgres.create_database(), postgres.create_database()
    made = {table: (cols, row) for table, (step, cols, row) in OLD_ROWS.items() if step <= version}
    conn = await asyncpg.connect(old)
    try:
        await conn.execute(old_postgres_schema(version))
        for table, (columns, row) in made.items():
            marks = ", ".join(f"${n}" for n in range(1, len(row) + 1))
            await conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *row)
        await migrate(PostgresSchema(conn))
        kept = {
            table: [tuple(r) for r in await conn.fetch(f"SELECT {', '.join(columns)} FROM {table}")]
            for table, (columns, _) in made.items()
        }
        stored = await conn.fetchval("SELECT SUM(bytes) FROM chat_bytes")
        versions = [r[0] for r in await conn.fetch("SELECT version FROM qp_schema")]
    finally:
        await conn.close()
    conn = await asyncpg.connect(new)
    try:
        await migrate(PostgresSchema(conn))
    finally:
        await conn.close()
    dump = schema_dump(new)
    assert "CREATE TABLE public.budget_reservations (" in dump
    assert schema_dump(old) == dump
    assert kept == {table: [row] for table, (_, row) in made.items()}
    assert (stored, versions) == (30, [SCHEMA_VERSION])


async def test_a_database_of_a_newer_version_is_refused_and_left_as_it_is(postgres):
    url = postgres.create_database()
    conn = await asyncpg.connect(url)
    try:
        await migrate(PostgresSchema(conn))
        await conn.execute("UPDATE qp_schema SET version = version + 1")
        before = schema_dump(url)
        with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
            await migrate(PostgresSchema(conn))
        assert await conn.fetchval("SELECT version FROM qp_schema") == SCHEMA_VERSION + 1
    finally:
        await conn.close()
    assert schema_dump(url) == before


async def test_a_step_that_fails_leaves_the_database_at_its_version(postgres):
    url = postgres.create_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(old_postgres_schema(3))
        # The column the last step adds is already there: the steps before it are undone.
        await conn.execute("ALTER TABLE rate_counts ADD COLUMN bucket INTEGER")
        with pytest.raises(asyncpg.DuplicateColumnError):
            await migrate(PostgresSchema(conn))
        assert await conn.fetchval("SELECT version FROM qp_schema") == 3
        columns = "SELECT column_name FROM information_schema.columns WHERE table_name = $1"
        assert "reservation_id" not in [r[0] for r in await conn.fetch(columns, "completions")]
        assert await conn.fetchval("SELECT to_regclass('chat_bytes')") is None
    finally:
        await conn.close()


def listener_session(postgres: PostgresServer, database: str) -> str:
    """The backend pid of the session a server hears other processes' changes on."""
    return postgres.psql(
        "SELECT pid FROM pg_stat_activity"
        " WHERE query LIKE 'LISTEN%' AND datname = current_database()",
        database,
    )


async def test_a_lost_listening_connection_drops_the_cache_and_listens_again(
    start_server, postgres
):
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    server = await start_server(QP_DATABASE=url)
    chat_id = await create(server.client, make_chat(app="lost", model="first"))
    assert (await call(server.client, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "first"
    first = listener_session(postgres, database)
    assert first
    # PostgreSQL ends that session (a failover, an operator); meanwhile a change is made
    # that nobody announces, as a process would whose notice went out while nobody listened.
    await asyncio.to_thread(postgres.psql, f"SELECT pg_terminate_backend({first}, 5000)", database)
    await asyncio.to_thread(
        postgres.psql, f"UPDATE chats SET model = 'second' WHERE chat_id = '{chat_id}'", database
    )
    # Nothing cached survives the loss, and nothing is cached until it listens again.
    for _ in range(20):
        status, chat = await call(server.client, "GET", f"/api/chats/{chat_id}")
        assert (status, chat["model"]) == (200, "second")
        await asyncio.sleep(0.1)
    for _ in range(50):
        again = listener_session(postgres, database)
        if again and again != first:
            break
        await asyncio.sleep(0.1)
    assert again and again != first
    chat = make_chat(chat_id, app="lost", model="third")
    assert await call(server.client, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}) == (
        200,
        {"success": True},
    )
    assert (await call(server.client, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "third"


async def test_postgresql_down_is_503_and_back_is_served_again(start_server, tmp_path, caplog):
    """PostgreSQL crashes under a running server: writes and uncached reads answer 503 (no
    500, nothing half done); once it is back, the server connects again and
    every acknowledged write is there."""
    own = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-pg-down-"))).start()
    try:
        url = own.create_database()
        server = await start_server(QP_DATABASE=url, QP_CACHE_MB="0")
        ids = [await create(server.client, make_chat(app="down")) for _ in range(3)]
        own.stop("immediate")
        assert await call(server.client, "POST", "/api/chats", json={"chat": make_chat()}) == (
            503,
            {"error": "Storage unavailable"},
        )
        assert (await call(server.client, "GET", f"/api/chats/{ids[0]}"))[0] == 503
        status, health = await call(server.client, "GET", "/healthz")
        assert (status, health["checks"]["database"]) == (503, "unavailable")
        assert "POST /api/chats: Database: ConnectionRefusedError: " in caplog.text
        own.resume()
        for _ in range(100):
            status, _ = await call(server.client, "POST", "/api/chats", json={"chat": make_chat()})
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        for chat_id in ids:
            assert (await call(server.client, "GET", f"/api/chats/{chat_id}"))[0] == 200
    finally:
        own.stop()
        shutil.rmtree(own.data_dir, ignore_errors=True)


async def test_a_write_whose_commit_fails_is_503_and_changes_nothing(
    start_server, postgres, caplog
):
    """The connection is lost at the commit of an update: 503, the chat as it was, the
    database itself healthy."""
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    server = await start_server(QP_DATABASE=url)
    chat_id = await create(server.client, make_chat(app="commit", model="before"))
    _, before = await call(server.client, "GET", f"/api/chats/{chat_id}")
    # Run at the commit (a deferred trigger), it ends the session that commits.
    lose_the_connection_at_commit = """
        CREATE FUNCTION lose_the_connection() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT OR UPDATE ON chats
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION lose_the_connection();
    """
    await asyncio.to_thread(postgres.psql, lose_the_connection_at_commit, database)
    update = make_chat(chat_id, app="commit", model="after")
    assert await call(server.client, "PUT", f"/api/chats/{chat_id}", json={"chat": update}) == (
        503,
        {"error": "Storage unavailable"},
    )
    await asyncio.to_thread(postgres.psql, "DROP TRIGGER at_commit ON chats", database)
    assert await call(server.client, "GET", f"/api/chats/{chat_id}") == (200, before)
    assert await call(server.client, "GET", "/healthz") == (200, {"status": "ok"})
    assert "PUT /api/chats/{chat_id}: Database: " in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_ledger_postgresql_cannot_take_is_retried_then_dropped_and_counted(
    start_server, fake, caplog, monkeypatch
):
    """PostgreSQL goes away after a completion was answered: its ledger row is retried,
    then given up, said so in the log and counted in /metrics."""
    # Three retries as in production, sooner (production waits 7.5 s in all).
    monkeypatch.setattr(BatchWriter, "RETRY_SECONDS", (0.1, 0.2, 0.3))
    own = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-pg-ledger-"))).start()
    try:
        server = await start_server(
            QP_DATABASE=own.create_database(),
            QP_OPENROUTER_URL=fake.url,
            OPENROUTER_API_KEY="server-key",
        )
        own.stop("immediate")
        request = completion_request("hello")
        async with server.client.post("/api/completion", json=request) as response:
            assert response.status == 200
            await response.read()
        dropped = "1 ledger rows dropped: Database: "
        await wait_until(lambda: dropped in caplog.text, 20, "the ledger row given up")
        assert "1 ledger rows not written yet (Database: " in caplog.text
        assert "); retrying" in caplog.text
        metrics = await server.client.get("/metrics")
        dropped = 'qp_batch_items_dropped_total{batch="ledger",reason="unavailable"} 1.0'
        assert dropped in await metrics.text()
        status, health = await call(server.client, "GET", "/healthz")
        assert (status, health["checks"]["database"]) == (503, "unavailable")
    finally:
        own.stop()
        shutil.rmtree(own.data_dir, ignore_errors=True)


# --- migrate-db -------------------------------------------------------------------------


async def test_migrate_db_gives_the_same_answers_ledger_and_blocks(tmp_path, postgres, fake):
    blobs = {"QP_STORAGE": f"file://{tmp_path / 'blobs'}"}
    served = {
        **blobs,
        "ADMIN_KEY": ADMIN_KEY,
        "QP_OPENROUTER_URL": fake.url,
        "OPENROUTER_API_KEY": "server-key",
        "QP_RATE_LIMIT_CHATS": "5/minute",
    }
    admin = {"x-admin-key": ADMIN_KEY}
    blocked = {"X-Forwarded-For": "198.51.100.7"}
    lite = QPServer(tmp_path / "sqlite", served).start()
    await a_fresh_minute()
    try:
        async with aiohttp.ClientSession(lite.url) as http:
            ids = [await create(http, make_chat(app=app)) for app in ("a", "a", "b")]
            again = make_chat(ids[0], app="a", messages=["changed"])
            assert (await call(http, "PUT", f"/api/chats/{ids[0]}", json={"chat": again}))[0] == 200
            for n in range(2):
                request = completion_request(app="a")
                headers = {"X-Forwarded-For": f"203.0.113.{n + 1}"}
                async with http.post("/api/completion", json=request, headers=headers) as got:
                    assert got.status == 200
                    await got.read()
            for _ in range(15):  # 5 in the minute, then 10 refusals: blocked
                async with http.get("/api/chats/nothing", headers=blocked):
                    pass
            before = await answers(http, ids, admin)
    finally:
        lite.stop()
    url = postgres.create_database()
    source = f"sqlite:///{lite.data_dir / 'qp.sqlite3'}"
    done = await asyncio.to_thread(
        run_qp, tmp_path / "tools", "migrate-db", "--from", source, "--to", url, "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"copied 3 chats, 2 ledger rows and 1 blocks from {source} to"
        f" {url.replace(PostgresServer.PASSWORD, '********')}"
    )
    # Once copied, the target is not empty: a second run must be told to append.
    again = await asyncio.to_thread(
        run_qp, tmp_path / "tools", "migrate-db", "--from", source, "--to", url, "--no-progress"
    )
    assert again.returncode == 1
    assert "the target is not empty" in again.stderr and "--append" in again.stderr

    pg = QPServer(tmp_path / "postgres", {**served, "QP_DATABASE": url}).start()
    try:
        async with aiohttp.ClientSession(pg.url) as http:
            assert await answers(http, ids, admin) == before
            # The salt came along: the blocked client is still refused.
            status, body = await call(http, "GET", "/api/chats/nothing", headers=blocked)
            assert (status, body["message"]) == (429, "IP blocked due to excessive violations")
    finally:
        pg.stop()

    # And back, into a new SQLite file: the same answers again.
    back = tmp_path / "back" / "qp.sqlite3"
    back.parent.mkdir()
    done = await asyncio.to_thread(
        run_qp, tmp_path / "tools", "migrate-db", "--from", url, "--to", f"sqlite:///{back}",
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("copied 3 chats, 2 ledger rows and 1 blocks")
    lite = QPServer(tmp_path / "sqlite-again", {**served, "QP_DATABASE": str(back)}).start()
    try:
        async with aiohttp.ClientSession(lite.url) as http:
            assert await answers(http, ids, admin) == before
    finally:
        lite.stop()


async def answers(http: aiohttp.ClientSession, ids: list[str], admin: dict) -> dict:
    """What a server answers about its data: each chat, the usage report, the blocks."""
    chats = [
        await call(
            http, "GET", f"/api/chats/{chat_id}", headers={"X-Forwarded-For": f"192.0.2.{n}"}
        )
        for n, chat_id in enumerate(ids)
    ]  # each from an address of its own: the chats routes are limited to 5 a minute here
    _, usage = await call(http, "GET", "/api/usage", headers=admin)
    _, blocks = await call(http, "GET", "/api/admin/blocks", headers=admin)
    return {"chats": chats, "usage": usage["totals"], "blocks": blocks["blocks"]}


def test_an_interrupted_migrate_db_carries_on_where_it_stopped(tmp_path, postgres):
    data = tmp_path / "data"
    assert run_qp(data, "blocks", "list").returncode == 0  # makes the SQLite schema
    rows = [
        (f"2026-11-{1 + n % 25:02d}T10:00:00.000Z", "a", "m", "server", 1, 1, n / 1e6)
        for n in range(30_000)
    ]
    with sqlite3.connect(data / "qp.sqlite3") as db:
        db.executemany(
            "INSERT INTO completions (started_at, app, model, payer, prompt_tokens,"
            " completion_tokens, cost, status, outcome, duration_ms, client_left)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 200, 'completed', 1, 0)",
            rows,
        )
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]

    def in_target(sql: str) -> str:
        try:
            return postgres.psql(sql, database)
        except subprocess.CalledProcessError:
            return ""  # its tables are not made yet

    source = f"sqlite:///{data / 'qp.sqlite3'}"
    command = [sys.executable, "-m", "qp", "migrate-db", "--from", source, "--to", url]
    copying = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tools_env(data)
    )
    try:
        mark = "SELECT value FROM settings WHERE name LIKE 'migrate_db:ledger_after:%'"
        while not in_target(mark):
            assert copying.poll() is None, copying.communicate()
            time.sleep(0.01)
        copying.kill()  # after its first batch of the ledger
    finally:
        copying.wait()
    assert copying.returncode == -signal.SIGKILL
    copied = int(in_target("SELECT COUNT(*) FROM completions"))
    assert 0 < copied < 30_000

    done = run_qp(tmp_path / "tools", "migrate-db", "--from", source, "--to", url, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"carried on copying 0 chats, {30_000 - copied} ledger rows")
    total = in_target("SELECT COUNT(*), ROUND(SUM(cost)::numeric, 6) FROM completions")
    assert total == f"30000|{round(sum(row[6] for row in rows), 6):.6f}"
    assert in_target("SELECT COUNT(*) FROM settings WHERE name = 'migrate_db:source'") == "0"
    # Run again, appending: each row was copied once, and is not copied again.
    again = run_qp(
        tmp_path / "tools", "migrate-db", "--from", source, "--to", url, "--append", "--no-progress"
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("copied 0 chats, 0 ledger rows and 0 blocks")
    assert in_target("SELECT COUNT(*) FROM completions") == "30000"


def sqlite_source(data: Path, chats: int, ledger: int, blocks: int) -> str:
    """A SQLite database holding that many chats' rows, ledger rows and blocks: its URL."""
    assert run_qp(data, "blocks", "list").returncode == 0  # makes the schema
    with sqlite3.connect(data / "qp.sqlite3") as db:
        db.executemany(
            "INSERT INTO chats (chat_id, app, model, created_at, updated_at)"
            " VALUES (?, 'a', 'm', '2026-11-01T10:00:00.000Z', '2026-11-01T10:00:00.000Z')",
            [(f"chat{n}",) for n in range(chats)],
        )
        db.executemany(LEDGER_ROW, [("m",)] * ledger)
        db.executemany(
            "INSERT INTO blocks VALUES (?, '2026-11-01T10:00:00.000Z', '2999-01-01T00:00:00.000Z')",
            [(f"{n:064x}",) for n in range(blocks)],
        )
    return f"sqlite:///{data / 'qp.sqlite3'}"


LEDGER_ROW = (
    "INSERT INTO completions (started_at, app, model, payer, status, outcome, duration_ms)"
    " VALUES ('2026-11-01T10:00:00.000Z', 'a', ?, 'server', 200, 'completed', 1)"
)


def migrate_db(tmp_path: Path, source: str, target: str, *more: str) -> subprocess.CompletedProcess:
    return run_qp(
        tmp_path / "tools", "migrate-db", "--from", source, "--to", target, "--no-progress", *more
    )


def test_migrate_db_appending_twice_copies_each_row_once(tmp_path, postgres):
    source = sqlite_source(tmp_path / "data", chats=2, ledger=3, blocks=1)
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    first = migrate_db(tmp_path, source, url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("copied 2 chats, 3 ledger rows and 1 blocks")
    with sqlite3.connect(tmp_path / "data" / "qp.sqlite3") as db:
        db.execute(LEDGER_ROW, ("new",))
    for copied in (1, 0):  # the new row, then nothing
        again = migrate_db(tmp_path, source, url, "--append")
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith(f"copied 2 chats, {copied} ledger rows and 1 blocks")
    held = (
        "SELECT (SELECT COUNT(*) FROM chats), (SELECT COUNT(*) FROM completions),"
        " (SELECT COUNT(*) FROM blocks)"
    )
    assert postgres.psql(held, database) == "2|4|1"


@pytest.mark.parametrize("spelling", ["same", "other"])
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_migrate_db_refuses_the_same_database_as_source_and_target(
    tmp_path, postgres, database, spelling
):
    if database == "sqlite":
        source = sqlite_source(tmp_path / "data", chats=1, ledger=3, blocks=0)
        (tmp_path / "link").symlink_to(tmp_path / "data")
        target = source if spelling == "same" else str(tmp_path / "link" / "qp.sqlite3")
    else:
        source = postgres.create_database()
        assert run_qp(tmp_path / "data", "blocks", "list", QP_DATABASE=source).returncode == 0
        postgres.psql(";".join([LEDGER_ROW.replace("?", "'m'")] * 3), source.rsplit("/", 1)[1])
        target = source if spelling == "same" else source.replace("127.0.0.1", "localhost")
    done = migrate_db(tmp_path, source, target, "--append")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "python -m qp: error: the source and the target are the same database (or copies"
        " of one): give --to another database"
    )
    if database == "sqlite":
        with sqlite3.connect(tmp_path / "data" / "qp.sqlite3") as db:
            assert db.execute("SELECT COUNT(*) FROM completions").fetchone() == (3,)
    else:
        assert postgres.psql("SELECT COUNT(*) FROM completions", source.rsplit("/", 1)[1]) == "3"


@pytest.mark.parametrize(
    ("kind", "statement"),
    [
        ("1 chats", "INSERT INTO chats (chat_id, app, model) VALUES ('c1', 'a', 'm')"),
        ("1 ledger rows", LEDGER_ROW.replace("?", "'m'")),
        ("1 blocks", "INSERT INTO blocks VALUES ('b1', '2026-01-01', '2999-01-01')"),
        (
            "1 budget accounts",
            "INSERT INTO budget_accounts (kind, name, period, period_start)"
            " VALUES ('server', '', 'day', 0)",
        ),
        ("1 prices", "INSERT INTO prices VALUES ('m', 0.1, 0.2, '2026-01-01')"),
    ],
)
def test_migrate_db_refuses_a_target_holding_any_one_thing(tmp_path, postgres, kind, statement):
    source = sqlite_source(tmp_path / "data", chats=1, ledger=1, blocks=1)
    url = postgres.create_database()
    assert run_qp(tmp_path / "target", "blocks", "list", QP_DATABASE=url).returncode == 0
    postgres.psql(statement, url.rsplit("/", 1)[1])
    done = migrate_db(tmp_path, source, url)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"python -m qp: error: the target is not empty ({kind}): give --append to add to it"
    )
    assert postgres.psql("SELECT COUNT(*) FROM chats", url.rsplit("/", 1)[1]) == (
        "1" if kind == "1 chats" else "0"
    )


def test_migrate_db_refuses_a_sqlite_target_holding_one_ledger_row(tmp_path):
    source = sqlite_source(tmp_path / "data", chats=1, ledger=0, blocks=0)
    target = sqlite_source(tmp_path / "target", chats=0, ledger=1, blocks=0)
    done = migrate_db(tmp_path, source, target)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "python -m qp: error: the target is not empty (1 ledger rows): give --append to add to it"
    )


def test_migrate_db_names_the_rows_holding_a_nul_and_copies_the_rest(tmp_path, postgres):
    source = sqlite_source(tmp_path / "data", chats=1, ledger=1, blocks=1)
    with sqlite3.connect(tmp_path / "data" / "qp.sqlite3") as db:
        db.execute(
            "INSERT INTO chats (chat_id, app, model, created_at, updated_at) VALUES"
            " ('evil', 'a', ?, '2026-11-01T10:00:00.000Z', '2026-11-01T10:00:00.000Z')",
            ("evil\x00model",),
        )
        db.execute(LEDGER_ROW, ("evil\x00model",))
        db.execute(LEDGER_ROW, ("m",))
    url = postgres.create_database()
    done = migrate_db(tmp_path, source, url)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "not copied: chats row 'evil': it holds a NUL character",
        "not copied: completions row id 2: it holds a NUL character",
    ]
    assert done.stdout.strip() == (
        f"copied 1 chats, 2 ledger rows and 1 blocks from {source} to"
        f" {url.replace(PostgresServer.PASSWORD, '********')}; 2 rows not copied (named above)"
    )
    held = (
        "SELECT (SELECT string_agg(chat_id, ',') FROM chats),"
        " (SELECT string_agg(model, ',' ORDER BY id) FROM completions)"
    )
    assert postgres.psql(held, url.rsplit("/", 1)[1]) == "chat0|m,m"
    # Run again: the ledger's rows are not copied twice, the chat is named again.
    again = migrate_db(tmp_path, source, url, "--append")
    assert again.returncode == 1
    assert again.stdout.startswith("copied 1 chats, 0 ledger rows and 1 blocks")
    assert again.stderr.splitlines() == ["not copied: chats row 'evil': it holds a NUL character"]


def tools_env(data: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QP_", "AWS_"))}
    return {**clean, "QP_DATA_DIR": str(data)}


@asynccontextmanager
async def announcements(url: str) -> AsyncIterator[asyncio.Queue[str]]:
    """The topics announced on the servers' changes channel from now on, as they come."""
    topics: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(url)
    try:
        await conn.add_listener(CHANGES, lambda *heard: topics.put_nowait(heard[-1]))
        yield topics
    finally:
        await conn.close()


async def hear(topics: asyncio.Queue[str], topic: str) -> None:
    """Until `topic` is announced (a minute at most: a bound against hanging, not a time
    the test measures)."""
    while await asyncio.wait_for(topics.get(), 60) != topic:
        pass


BLOCKED = "IP blocked due to excessive violations"


@pytest.fixture
def server_beside_tools(tmp_path, postgres) -> Iterator[tuple[QPServer, dict[str, str]]]:
    """A server on PostgreSQL, 5 chat requests a minute per client, and the tools'
    environment for its database."""
    env = {
        "QP_DATABASE": postgres.create_database(),
        "QP_STORAGE": f"file://{tmp_path / 'blobs'}",
        "QP_RATE_LIMIT_CHATS": "5/minute",
    }
    # Started within a minute: a loaded machine may take longer than the usual 20 s.
    server = QPServer(tmp_path / "server", {**env, "ADMIN_KEY": ADMIN_KEY}).start(timeout=60)
    yield server, env
    server.stop()


async def test_a_chat_the_tools_delete_is_dropped_from_the_running_servers_cache(
    tmp_path, server_beside_tools
):
    """The tool announces its write; the server drops its copy when it hears that (not
    timed: how soon depends on the machine's load, not on qp-server)."""
    server, env = server_beside_tools
    # Each read from an address of its own (5 a minute each).
    readers = ({"X-Forwarded-For": f"198.18.{n // 250}.{n % 250}"} for n in itertools.count())
    async with aiohttp.ClientSession(server.url) as http:
        chat_id = await create(http, make_chat(app="tools"))
        assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200  # now cached
        async with announcements(env["QP_DATABASE"]) as topics:
            deleted = await asyncio.to_thread(
                run_qp, tmp_path / "tools", "chats", "delete", chat_id, **env
            )
            assert deleted.returncode == 0, deleted.stderr
            await hear(topics, "")  # anything may have changed

        async def gone() -> bool:
            status, _ = await call(http, "GET", f"/api/chats/{chat_id}", headers=next(readers))
            return status == 404

        await eventually(gone, "the deleted chat still served from the cache")


async def test_a_block_the_tools_lift_is_lifted_on_the_running_server(
    tmp_path, server_beside_tools
):
    """The tool announces its write; the server takes the blocks again from the database
    in the next round of housekeeping after it heard that (once a second; not timed)."""
    server, env = server_beside_tools
    client = {"X-Forwarded-For": "198.51.100.8"}
    async with aiohttp.ClientSession(server.url) as http:

        async def blocked() -> bool:
            _, body = await call(http, "GET", "/api/chats/nothing", headers=client)
            return body.get("message") == BLOCKED

        # 5 in the minute, then 10 refusals: blocked (later, if a minute ends meanwhile).
        await eventually(blocked, "the client not blocked")
        _, found = await call(http, "GET", "/api/admin/blocks", headers={"x-admin-key": ADMIN_KEY})
        async with announcements(env["QP_DATABASE"]) as topics:
            lifted = await asyncio.to_thread(
                run_qp, tmp_path / "tools", "blocks", "lift", found["blocks"][0]["client"], **env
            )
            assert lifted.returncode == 0, lifted.stderr
            await hear(topics, "")

        answers = []

        async def served_again() -> bool:
            answers.append(await call(http, "GET", "/api/chats/nothing", headers=client))
            return answers[-1][1].get("message") != BLOCKED

        await eventually(served_again, "the lifted block still in force")
        # Served as any client: its minute is still used up, unless it ended meanwhile.
        status, body = answers[-1]
        assert (status, body.get("message")) in (
            (429, "Rate limit exceeded: 5 requests per minute"),
            (404, None),
        ), body
