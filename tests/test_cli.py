"""`python -m qp ...`: the operators' command line, on the server's own data."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.app_server import Database
from tests.helpers import (
    ADMIN_KEY,
    a_fresh_hour,
    a_fresh_minute,
    block_by_refusals,
    call,
    create,
    make_chat,
    run_qp,
    served_once_then_limited_not_blocked,
)
from tests.processes import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "worker-export"


qp = run_qp


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("python -m qp: error: ")
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["chats"],
        ["chats", "list"],
        ["chats", "show"],
        ["chats", "delete"],
        ["usage"],
        ["blocks"],
        ["blocks", "list"],
        ["blocks", "lift"],
        ["check"],
        ["import-d1"],
        ["copy-blobs"],
    ],
)
def test_every_command_has_help(tmp_path, command):
    result = qp(tmp_path, *command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m qp")


def test_a_missing_argument_is_a_usage_error(tmp_path):
    result = qp(tmp_path, "chats", "list")
    assert result.returncode == 2
    assert "--app" in result.stderr


# --- chats, usage, blocks on a server's data -------------------------------------------------


async def test_chats_list_show_delete(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        ids = [await create(http, make_chat(app="cli-app", messages=[i])) for i in range(3)]
        _, served = await call(http, "GET", f"/api/chats/{ids[1]}")
        listing = qp(server.data_dir, "chats", "list", "--app", "cli-app")
        assert listing.returncode == 0
        rows = listing.stdout.splitlines()
        assert rows[0].split() == ["CHAT", "ID", "UPDATED", "MODEL", "PROMPT", "COMPLETION"]
        assert [row.split()[0] for row in rows[1:]] == ids[::-1]

        shown = qp(server.data_dir, "chats", "show", ids[1])
        assert shown.returncode == 0
        assert json.loads(shown.stdout) == served

        deleted = qp(server.data_dir, "chats", "delete", ids[1])
        assert deleted.returncode == 0
        # The running server sees it within a second, cached or not.
        for _ in range(40):
            if (await call(http, "GET", f"/api/chats/{ids[1]}"))[0] == 404:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server still serves a chat deleted by the tool")
        assert not (server.data_dir / "blobs" / "chats" / f"{ids[1]}.json").exists()
    one_line_error(qp(server.data_dir, "chats", "show", ids[1]), "no chat", ids[1])
    one_line_error(qp(server.data_dir, "chats", "delete", "../x"), "not a chat id")


async def test_usage_totals(qp_server):
    server = qp_server()
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        db.executemany(
            "INSERT INTO completions (started_at, app, model, payer, prompt_tokens,"
            " completion_tokens, cost, status, outcome, duration_ms, client_left)"
            " VALUES (?, 'a', 'm', ?, 10, 5, 0.25, 200, 'completed', 1, 0)",
            [("2026-01-01T00:00:00.000Z", "server"), ("2026-06-01T00:00:00.000Z", "server")],
        )
    result = qp(server.data_dir, "usage", "--app", "a", "--since", "2026-03-01")
    assert result.returncode == 0
    assert result.stdout.splitlines()[1].split() == [
        "a",
        "m",
        "server",
        "1",
        "10",
        "5",
        "0.250000",
        "0",
    ]
    one_line_error(qp(server.data_dir, "usage", "--since", "soon"), "--since")


async def test_blocks_list_and_lift_reach_the_running_server(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(12):
            _, body = await call(http, "GET", "/api/chats/x")
        assert body["message"] == "IP blocked due to excessive violations"
        listing = qp(server.data_dir, "blocks", "list")
        assert listing.returncode == 0
        client_hash = listing.stdout.splitlines()[1].split()[0]
        assert len(client_hash) == 64
        lifted = qp(server.data_dir, "blocks", "lift", client_hash)
        assert lifted.returncode == 0, lifted.stderr
        for _ in range(40):
            _, body = await call(http, "GET", "/api/chats/x")
            if body.get("message") != "IP blocked due to excessive violations":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the running server kept the lifted block")
        assert qp(server.data_dir, "blocks", "list").stdout.splitlines()[1:] == []
    one_line_error(qp(server.data_dir, "blocks", "lift", client_hash), "no block")


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_blocks_lift_gives_fresh_counts_so_the_next_refusal_does_not_block_again(
    qp_server, request, database
):
    env = {"QP_RATE_LIMIT_CHATS": "1/hour"}
    if database == "postgres":
        env["QP_DATABASE"] = request.getfixturevalue("postgres").create_database()
    server = qp_server(**env)
    client = {"X-Forwarded-For": "198.51.100.20"}
    await a_fresh_hour()
    async with aiohttp.ClientSession(server.url) as http:
        await block_by_refusals(http, client)
        listing = qp(server.data_dir, "blocks", "list", **env)
        client_hash = listing.stdout.splitlines()[1].split()[0]
        lifted = qp(server.data_dir, "blocks", "lift", client_hash, **env)
        assert lifted.returncode == 0, lifted.stderr
        await served_once_then_limited_not_blocked(http, client, wait=True)
        assert qp(server.data_dir, "blocks", "list", **env).stdout.splitlines()[1:] == []


# --- check and repair ------------------------------------------------------------------------


def named_blob(data: Path, chat_id: str) -> Path:
    """The blob file the chat's row names."""
    with sqlite3.connect(data / "qp.sqlite3") as db:
        ((rev,),) = db.execute("SELECT blob_rev FROM chats WHERE chat_id = ?", (chat_id,))
    return data / "blobs" / "chats" / chat_id / f"{rev}.json"


async def test_check_finds_and_repairs_what_cannot_be_served(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="c"))
        no_blob = await create(http, make_chat(app="c"))
        unreadable = await create(http, make_chat(app="c"))
    server.stop()
    chats = server.data_dir / "blobs" / "chats"
    named_blob(server.data_dir, no_blob).unlink()
    named_blob(server.data_dir, unreadable).write_text("{not an array")
    (chats / "orphan.json").write_text("[]")  # the worker's key, no row
    (chats / kept / "stale.json").write_text("[]")  # a revision no row names
    assert qp(server.data_dir, "check").stdout == "nothing to repair\n"  # all younger than 60 s

    found = qp(server.data_dir, "check", "--min-age", "0")
    assert found.returncode == 1
    assert sorted(found.stdout.splitlines()) == sorted(
        [
            f"row-without-blob {no_blob}",
            f"unreadable-blob {unreadable} (not a JSON array)",
            "blob-without-row orphan chats/orphan.json",
            f"blob-without-row {kept} chats/{kept}/stale.json",
        ]
    )
    repaired = qp(server.data_dir, "check", "--min-age", "0", "--repair")
    assert repaired.returncode == 0
    assert sorted(repaired.stdout.splitlines()[-3:]) == sorted(
        [
            f"removed chat {no_blob} (row-without-blob)",
            f"removed chat {unreadable} (unreadable-blob)",
            "deleted 4 blobs no row names",
        ]
    )
    again = qp(server.data_dir, "check", "--min-age", "0")
    assert (again.returncode, again.stdout) == (0, "nothing to repair\n")
    assert sorted(str(p.relative_to(chats)) for p in chats.rglob("*.json")) == [
        str(named_blob(server.data_dir, kept).relative_to(chats))
    ]
    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        assert (await call(http, "GET", f"/api/chats/{kept}"))[0] == 200
        for gone in (no_blob, unreadable, "orphan"):
            assert (await call(http, "GET", f"/api/chats/{gone}"))[0] == 404


async def test_check_repair_leaves_a_write_in_flight_to_its_bound(qp_server):
    """A blob whose write has not committed yet (its intent is recorded) is not removed,
    however old: the write may still commit it."""
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        kept = await create(http, make_chat(app="c"))
    server.stop()
    in_flight = server.data_dir / "blobs" / "chats" / kept / "in-flight.json"
    in_flight.write_text("[]")
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        db.execute("INSERT INTO chat_writes VALUES ('in-flight', ?, strftime('%s'))", (kept,))
    checked = qp(server.data_dir, "check", "--min-age", "0", "--repair")
    assert (checked.returncode, checked.stdout) == (0, "nothing to repair\n")
    assert in_flight.exists()
    given_up = qp(
        server.data_dir,
        "check",
        "--min-age",
        "0",
        "--repair",
        QP_WRITE_ABANDON_SECONDS="0.001",
        QP_S3_TIMEOUT="0.0001",
    )
    assert given_up.stdout == "nothing to repair\ndeleted 1 blobs no row names\n"
    assert not in_flight.exists()
    assert named_blob(server.data_dir, kept).exists()


@pytest.mark.on_both_databases
async def test_check_counts_again_a_total_of_bytes_stored_the_rows_do_not_bear_out(
    qp_server, request, database_name
):
    url = request.getfixturevalue("postgres").create_database() if database_name != "sqlite" else ""
    env = {"QP_DATABASE": url} if url else {}
    server = qp_server(**env)
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(3):
            await create(http, make_chat(app="c", messages=["x" * 96]))  # 100 bytes each
    server.stop()
    database = Database(server.data_dir, url or None)
    database.execute_many("UPDATE chat_bytes SET bytes = bytes + ?", [(7,)])
    counted = database.rows("SELECT SUM(bytes) AS total FROM chat_bytes")[0]["total"]
    found = qp(server.data_dir, "check", "--min-age", "0", **env)
    assert (found.returncode, found.stdout) == (
        1,
        f"bytes-miscounted (counted {counted}, the rows hold 300)\n",
    )
    repaired = qp(server.data_dir, "check", "--min-age", "0", "--repair", **env)
    assert repaired.stdout.splitlines()[-1] == "counted the bytes stored again"
    assert database.rows("SELECT SUM(bytes) AS total FROM chat_bytes") == [{"total": 300}]
    again = qp(server.data_dir, "check", "--min-age", "0", **env)
    assert (again.returncode, again.stdout) == (0, "nothing to repair\n")


# --- moving from the worker: import-d1 and copy-blobs ------------------------------------------


def expected_worker_chats() -> dict[str, dict]:
    """What the worker answered for each exported chat: its row and its R2 messages."""
    scratch = sqlite3.connect(":memory:")
    scratch.executescript((FIXTURE / "d1-export.sql").read_text())
    chats = {}
    for chat_id, app, model, prompt, completion, cost, created, updated in scratch.execute(
        "SELECT * FROM chats"
    ):
        blob = FIXTURE / "r2" / "chats" / f"{chat_id}.json"
        if blob.exists():
            chats[chat_id] = {
                "chatId": chat_id,
                "app": app,
                "model": model,
                "messages": json.loads(blob.read_bytes()),
                "totalUsage": {
                    "promptTokens": prompt,
                    "completionTokens": completion,
                    "estimatedCost": cost,
                },
                "createdAt": created,
                "updatedAt": updated,
            }
    return chats


async def test_a_worker_export_imports_into_servable_chats_idempotently(qp_server, tmp_path):
    data = tmp_path / "moved"
    first = qp(data, "import-d1", str(FIXTURE / "d1-export.sql"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == "24 chats added, 0 replaced by newer, 0 unchanged, 1 refused\n"
    assert "not imported: '../escape': invalid chat id" in first.stderr
    copied = qp(
        data, "copy-blobs", "--from", f"file://{FIXTURE / 'r2'}", "--to", f"file://{data / 'blobs'}"
    )
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout == "24 copied, 0 already there\n"

    rows_before = chat_rows(data)
    again = qp(data, "import-d1", str(FIXTURE / "d1-export.sql"))
    assert again.stdout == "0 chats added, 0 replaced by newer, 24 unchanged, 1 refused\n"
    resumed = qp(
        data, "copy-blobs", "--from", f"file://{FIXTURE / 'r2'}", "--to", f"file://{data / 'blobs'}"
    )
    assert resumed.stdout == "0 copied, 24 already there\n"
    assert chat_rows(data) == rows_before
    assert len(rows_before) == 24

    server = qp_server("moved-server", QP_DATA_DIR=str(data))
    expected = expected_worker_chats()
    assert len(expected) == 24
    async with aiohttp.ClientSession(server.url) as http:
        for chat_id, chat in expected.items():
            assert await call(http, "GET", f"/api/chats/{chat_id}") == (200, chat)
        _, listed = await call(
            http, "GET", "/api/chats?app=o'brien-lab", headers={"x-admin-key": ADMIN_KEY}
        )
        assert {c["chatId"] for c in listed} == {
            i for i, c in expected.items() if c["app"] == "o'brien-lab"
        }
    assert qp(data, "check", "--min-age", "0").stdout == "nothing to repair\n"

    # Going back: one chat written again through the server lives at a key of its own,
    # and the worker's layout brings every chat's current messages back to its key.
    sample = "AxXTjIlpWsbgd0DbuAzbR"
    async with aiohttp.ClientSession(server.url) as http:
        chat = make_chat(sample, app=expected[sample]["app"], messages=["written again"])
        assert (await call(http, "PUT", f"/api/chats/{sample}", json={"chat": chat}))[0] == 200
    server.stop()
    # It moved on to a key of its own (the worker's key is the sweep's to delete).
    assert named_blob(data, sample).exists()
    back = tmp_path / "back-to-the-worker"
    written = qp(
        data,
        "copy-blobs",
        "--layout",
        "worker",
        "--from",
        f"file://{data / 'blobs'}",
        "--to",
        f"file://{back}",
    )
    assert (written.returncode, written.stdout) == (0, "24 copied, 0 already there\n")
    assert sorted(p.name for p in (back / "chats").iterdir()) == sorted(
        f"{chat_id}.json" for chat_id in expected
    )
    for chat_id, chat in expected.items():
        messages = ["written again"] if chat_id == sample else chat["messages"]
        assert json.loads((back / "chats" / f"{chat_id}.json").read_bytes()) == messages


def chat_rows(data: Path) -> list[tuple]:
    with sqlite3.connect(data / "qp.sqlite3") as db:
        return db.execute("SELECT * FROM chats ORDER BY chat_id").fetchall()


def test_a_dump_with_an_unknown_statement_is_refused_whole(tmp_path):
    dump = tmp_path / "dump.sql"
    text = (FIXTURE / "d1-export.sql").read_text()
    dump.write_text(text.replace("CREATE INDEX idx_app", "DROP TABLE chats;\nCREATE INDEX idx_app"))
    result = qp(tmp_path / "data", "import-d1", str(dump))
    one_line_error(result, "not a statement of a chats export", "DROP TABLE chats")
    # Refused before anything was opened: no database, no rows.
    assert not (tmp_path / "data" / "qp.sqlite3").exists()


def test_copy_blobs_to_and_from_s3(tmp_path, seaweed):
    bucket = seaweed.create_bucket()
    env = {
        "AWS_ACCESS_KEY_ID": seaweed.server_env(bucket)["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": seaweed.server_env(bucket)["AWS_SECRET_ACCESS_KEY"],
        "AWS_REGION": "us-east-1",
    }
    up = qp(
        tmp_path,
        "copy-blobs",
        "--from",
        f"file://{FIXTURE / 'r2'}",
        "--to",
        f"s3://{bucket}/qp",
        "--to-endpoint-url",
        seaweed.endpoint_url,
        **env,
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout == "24 copied, 0 already there\n"
    assert "24/24" in up.stderr  # the progress bar
    sample = "AxXTjIlpWsbgd0DbuAzbR"
    assert (
        seaweed.get_object(bucket, f"qp/chats/{sample}.json")
        == (FIXTURE / "r2" / "chats" / f"{sample}.json").read_bytes()
    )
    down = qp(
        tmp_path,
        "copy-blobs",
        "--from",
        f"s3://{bucket}/qp",
        "--to",
        f"file://{tmp_path / 'copy'}",
        "--from-endpoint-url",
        seaweed.endpoint_url,
        **env,
    )
    assert down.stdout == "24 copied, 0 already there\n"
    (tmp_path / "copy" / "chats" / f"{sample}.json").unlink()
    resumed = qp(
        tmp_path,
        "copy-blobs",
        "--from",
        f"s3://{bucket}/qp",
        "--to",
        f"file://{tmp_path / 'copy'}",
        "--from-endpoint-url",
        seaweed.endpoint_url,
        **env,
    )
    assert resumed.stdout == "1 copied, 23 already there\n"
    one_line_error(
        qp(
            tmp_path,
            "copy-blobs",
            "--from",
            "s3://no-such-bucket",
            "--to",
            f"file://{tmp_path}",
            "--from-endpoint-url",
            seaweed.endpoint_url,
            **env,
        ),
        "--from",
        "no-such-bucket",
        "does not exist",
    )
    one_line_error(qp(tmp_path, "copy-blobs", "--from", "ftp://x", "--to", "file://y"), "--from")


def test_a_bad_storage_setting_is_one_line(tmp_path):
    one_line_error(qp(tmp_path, "check", QP_STORAGE="gopher://x"), "QP_STORAGE")
