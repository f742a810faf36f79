"""A server- or app-paid stream that ended without usage is costed at its estimate, then at
what OpenRouter billed for its generation, looked up with the key that paid, retried while
not yet there, and carried across a restart."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import FakeOpenRouter, Generation, Script
from tests.helpers import SYSTEM, call

CHEAP = "openai/gpt-4.1-mini"
KEYS = {"OPENROUTER_API_KEY": "server-key", "OPENROUTER_API_KEY_BIDS_ASSISTANT": "bids-key"}


async def start(start_server: StartServer, fake: FakeOpenRouter, **env: str) -> AppServer:
    return await start_server(
        QP_OPENROUTER_URL=fake.url, QP_BUDGET_DEFAULT_RESERVE_USD="0.01", **KEYS, **env
    )


def completion(content: str, app: str = "nwb-assistant") -> dict:
    return {
        "model": CHEAP,
        "systemMessage": SYSTEM,
        "messages": [{"role": "user", "content": content}],
        "app": app,
    }


def long_stream(generation_id: str) -> Script:
    """A stream whose first chunk names its generation, then stays silent for a while."""
    first = f'data: {{"id":"{generation_id}","choices":[]}}\n\n'.encode()
    return Script(chunks=[(0.0, first), (30.0, b"data: [DONE]\n\n")])


async def leave_after_first_chunk(server: AppServer, request: dict, headers=None) -> None:
    response = await server.client.post("/api/completion", json=request, headers=headers)
    assert response.status == 200
    await response.content.readany()
    response.close()


def ledger(server: AppServer) -> list[dict]:
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM completions ORDER BY id")]


async def ledger_when(server: AppServer, done, seconds: float = 15.0) -> list[dict]:
    """The ledger once `done(rows)` holds (checked every 0.1 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not done(rows := ledger(server)):
        if loop.time() > deadline:
            raise AssertionError(f"the ledger never got there: {rows}")
        await asyncio.sleep(0.1)
    return rows


def settled(rows: list[dict]) -> bool:
    return bool(rows) and all(row["cost_next_lookup"] is None for row in rows)


async def test_a_client_that_left_is_costed_at_what_was_billed(start_server, fake, admin):
    server = await start(start_server, fake, QP_BUDGET_SERVER_DAILY_USD="1")
    fake.scripts["left-1"] = long_stream("gen-left-1")
    fake.generations["gen-left-1"] = Generation(0.0031, 40, 7, not_ready=2)
    await leave_after_first_chunk(server, completion("script:left-1"))
    (row,) = await ledger_when(server, lambda rows: rows and rows[0]["cost_owed_until"])
    assert (row["outcome"], row["cost"], row["cost_source"]) == ("client_left", 0.01, "estimate")
    (row,) = await ledger_when(server, settled)
    assert (row["cost"], row["prompt_tokens"], row["completion_tokens"], row["cost_source"]) == (
        0.0031,
        40,
        7,
        "generation",
    )
    assert [lookup for lookup in fake.lookups if lookup[0] == "gen-left-1"] == [
        ("gen-left-1", "Bearer server-key", 404),
        ("gen-left-1", "Bearer server-key", 404),
        ("gen-left-1", "Bearer server-key", 200),
    ]
    # The budget counts what was billed, not the estimate.
    _, report = await call(server.client, "GET", "/api/usage", headers=admin)
    assert report["budgets"][0]["spent"] == pytest.approx(0.0031)
    assert report["totals"][0]["costSource"] == {"stream": 0, "generation": 1, "estimate": 0}


async def test_an_app_paid_stream_is_looked_up_with_the_apps_key(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-2"] = long_stream("gen-left-2")
    fake.generations["gen-left-2"] = Generation(0.002, 10, 2)
    await leave_after_first_chunk(server, completion("script:left-2", app="bids-assistant"))
    (row,) = await ledger_when(server, settled)
    assert (row["payer"], row["cost"], row["cost_source"]) == ("app", 0.002, "generation")
    assert ("gen-left-2", "Bearer bids-key", 200) in fake.lookups


async def test_lookups_still_owed_are_finished_after_a_restart(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-3"] = long_stream("gen-left-3")
    fake.generations["gen-left-3"] = Generation(0.0044, 30, 9)
    await leave_after_first_chunk(server, completion("script:left-3"))
    await ledger_when(server, lambda rows: rows and rows[0]["cost_owed_until"])
    await server.stop()  # before the first lookup, a second after the stream ended
    assert not [lookup for lookup in fake.lookups if lookup[0] == "gen-left-3"]
    again = await start(start_server, fake, QP_DATA_DIR=str(server.data_dir))
    (row,) = await ledger_when(again, settled)
    assert (row["cost"], row["cost_source"]) == (0.0044, "generation")


async def test_a_cost_never_found_keeps_the_estimate(start_server, fake, monkeypatch):
    monkeypatch.setattr("qp.spend.lookups.LOOKUP_WINDOW", 2.5)
    server = await start(start_server, fake)
    fake.scripts["left-4"] = long_stream("gen-left-4")  # never billed: always 404
    await leave_after_first_chunk(server, completion("script:left-4"))
    (row,) = await ledger_when(server, settled)
    assert (row["cost"], row["cost_source"], row["cost_owed_until"]) == (0.01, "estimate", None)
    assert {lookup[2] for lookup in fake.lookups if lookup[0] == "gen-left-4"} == {404}


async def test_nothing_is_owed_for_a_users_key_or_a_stream_without_an_id(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-5"] = long_stream("gen-left-5")
    fake.scripts["no-id"] = Script(chunks=[(0.0, b": OPENROUTER PROCESSING\n\n"), (30.0, b"")])
    await leave_after_first_chunk(
        server, completion("script:left-5"), headers={"x-openrouter-key": "user-key"}
    )
    await leave_after_first_chunk(server, completion("script:no-id"))
    rows = await ledger_when(server, lambda rows: len(rows) == 2)
    assert [
        (r["payer"], r["generation_id"], r["cost_source"], r["cost_owed_until"]) for r in rows
    ] == [
        ("user", "gen-left-5", "estimate", None),
        ("server", None, "estimate", None),
    ]
