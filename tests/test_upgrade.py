"""Upgrading to copy-on-write chats: a database of the last in-place version (SQLite schema
6, PostgreSQL's old step 2) with a write of each kind still pending starts as a real server and
serves every acknowledged write intact; each pending write is resolved once by the old
rule (its blob holds its messages: finished; else undone)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from qp.storage.schema import STEPS
from tests.app_server import sql_literal
from tests.helpers import call, make_chat, old_postgres_schema
from tests.processes import PostgresServer, QPServer

OLD_SQLITE_VERSION = 6
OLD_POSTGRES_VERSION = 2
T1, T2 = "2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z"
COLUMNS = (
    "chat_id, app, model, prompt_tokens, completion_tokens, estimated_cost, created_at,"
    " updated_at, pending, messages_bytes"
)


def messages(name: str) -> bytes:
    return orjson.dumps([{"role": "user", "content": name}])


def note(op: str, written: bytes, previous: dict | None = None) -> str:
    intent = {"op": op, "sha256": hashlib.sha256(written).hexdigest(), "at": time.time() - 99}
    if previous is not None:
        intent["previous"] = previous
    return orjson.dumps(intent).decode()


def previous_row(chat_id: str) -> dict:
    """The row as the old version kept it in an update's note: version 1 of the chat."""
    return {
        "chat_id": chat_id,
        "app": "upgrade-app",
        "model": "v1",
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "estimated_cost": 0.5,
        "created_at": T1,
        "updated_at": T1,
        "messages_bytes": len(messages("v1")),
    }


# chat id -> (the row's model and prompt tokens, its note, what the worker's key holds)
CASES = {
    "settled": (("v1", 1), None, messages("v1")),
    "create-finished": (("v1", 1), note("create", messages("v1")), messages("v1")),
    "create-interrupted": (("v1", 1), note("create", messages("v1")), None),
    "update-finished": (
        ("v2", 2),
        note("update", messages("v2"), previous_row("update-finished")),
        messages("v2"),
    ),
    "update-interrupted": (
        ("v2", 2),
        note("update", messages("v2"), previous_row("update-interrupted")),
        messages("v1"),
    ),
    # A note that is not a whole one of the old writer's: the row is kept as it is.
    "update-unreadable": (
        ("v2", 2),
        orjson.dumps({"op": "update", "sha256": "0" * 64, "previous": {}}).decode(),
        messages("v2"),
    ),
}
# What each serves after the upgrade: (model, prompt tokens, messages, updatedAt), or None.
EXPECTED = {
    "settled": ("v1", 1, "v1", T2),
    "create-finished": ("v1", 1, "v1", T2),
    "create-interrupted": None,
    "update-finished": ("v2", 2, "v2", T2),
    "update-interrupted": ("v1", 1, "v1", T1),
    "update-unreadable": ("v2", 2, "v2", T2),
}


def old_rows() -> list[tuple]:
    rows = []
    for chat_id, ((model, prompt), pending, _) in CASES.items():
        size = len(messages(model))
        rows.append((chat_id, "upgrade-app", model, prompt, 5, 0.5, T1, T2, pending, size))
    return rows


def write_blobs(data_dir: Path) -> None:
    folder = data_dir / "blobs" / "chats"
    folder.mkdir(parents=True)
    for chat_id, (_, _, stored) in CASES.items():
        if stored is not None:
            (folder / f"{chat_id}.json").write_bytes(stored)


def old_sqlite(data_dir: Path) -> None:
    with sqlite3.connect(data_dir / "qp.sqlite3") as db:
        for step in STEPS[:OLD_SQLITE_VERSION]:
            for statement in step.sqlite:
                db.execute(statement)
        marks = ", ".join("?" * 10)
        db.executemany(f"INSERT INTO chats ({COLUMNS}) VALUES ({marks})", old_rows())
        db.execute(f"PRAGMA user_version = {OLD_SQLITE_VERSION}")


def old_postgres(postgres: PostgresServer) -> str:
    url = postgres.create_database()
    statements = [old_postgres_schema(OLD_POSTGRES_VERSION)]
    for row in old_rows():
        values = ", ".join(sql_literal(value) for value in row)
        statements.append(f"INSERT INTO chats ({COLUMNS}) VALUES ({values})")
    postgres.psql(";\n".join(statements), url.rsplit("/", 1)[1])
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def upgraded(request, tmp_path) -> QPServer:
    data_dir = tmp_path / "qp"
    data_dir.mkdir()
    write_blobs(data_dir)
    env = {}
    if request.param == "sqlite":
        old_sqlite(data_dir)
    else:
        env["QP_DATABASE"] = old_postgres(request.getfixturevalue("postgres"))
    qp_server = request.getfixturevalue("qp_server")
    # A short write bound: housekeeping sweeps the garbage every second.
    return qp_server("qp", QP_S3_TIMEOUT="1", QP_WRITE_ABANDON_SECONDS="4", **env)


async def test_every_acknowledged_write_is_served_after_the_upgrade(upgraded):
    async with aiohttp.ClientSession(upgraded.url) as http:
        for chat_id, expected in EXPECTED.items():
            status, body = await call(http, "GET", f"/api/chats/{chat_id}")
            if expected is None:
                assert (status, body) == (404, {"error": "Chat not found"}), chat_id
                continue
            model, prompt, content, updated_at = expected
            assert status == 200, chat_id
            assert (body["model"], body["totalUsage"]["promptTokens"]) == (model, prompt)
            assert body["messages"] == [{"role": "user", "content": content}], chat_id
            assert body["updatedAt"] == updated_at, chat_id
    log = upgraded.log()
    assert "resolved 4 chat writes an older version left: 2 finished, 2 undone" in log
    assert "a chat row's old pending note cannot be read; the row is kept as is" in log


async def test_a_legacy_chats_first_update_moves_it_to_a_key_of_its_own(upgraded):
    legacy = upgraded.data_dir / "blobs" / "chats" / "settled.json"
    assert legacy.exists()
    async with aiohttp.ClientSession(upgraded.url) as http:
        _, before = await call(http, "GET", "/api/chats/settled")
        chat = make_chat("settled", app="upgrade-app", model="v3", messages=["v3"])
        assert await call(http, "PUT", "/api/chats/settled", json={"chat": chat}) == (
            200,
            {"success": True},
        )
        status, after = await call(http, "GET", "/api/chats/settled")
    assert status == 200
    assert (after["model"], after["messages"]) == ("v3", ["v3"])
    assert after["createdAt"] == before["createdAt"]
    new_blobs = list((upgraded.data_dir / "blobs" / "chats" / "settled").glob("*.json"))
    assert [orjson.loads(path.read_bytes()) for path in new_blobs] == [["v3"]]
    # The worker's key is garbage once superseded, and deleted a moment later.
    deadline = time.monotonic() + 10
    while legacy.exists():
        assert time.monotonic() < deadline, "the worker's blob was not deleted"
        await asyncio.sleep(0.05)
