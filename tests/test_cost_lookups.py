"""A server- or app-paid stream that ended without usage is costed at its estimate, then at
what OpenRouter billed for its generation, looked up with the key that paid, retried while
not yet there, and carried across a restart."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import FakeOpenRouter, Generation, Script, billed_stream
from tests.helpers import ADMIN_KEY, call, completion_request, ledger
from tests.processes import QPServer

pytestmark = pytest.mark.on_both_databases

CHEAP = "openai/gpt-4.1-mini"
KEYS = {"OPENROUTER_API_KEY": "server-key", "OPENROUTER_API_KEY_BIDS_ASSISTANT": "bids-key"}


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeOpenRouter) -> None:
    """What the module's fake billed and was asked, from this test's requests only (the
    same generation ids come back on each database)."""
    fake.generations.clear()
    fake.lookups.clear()


async def start(start_server: StartServer, fake: FakeOpenRouter, **env: str) -> AppServer:
    return await start_server(
        QP_OPENROUTER_URL=fake.url, QP_BUDGET_DEFAULT_RESERVE_USD="0.01", **KEYS, **env
    )


def long_stream(generation_id: str) -> Script:
    """A stream whose first chunk names its generation, then stays silent for a while."""
    first = f'data: {{"id":"{generation_id}","choices":[]}}\n\n'.encode()
    return Script(chunks=[(0.0, first), (30.0, b"data: [DONE]\n\n")])


async def leave_after_first_chunk(server: AppServer, request: dict, headers=None) -> None:
    response = await server.client.post("/api/completion", json=request, headers=headers)
    assert response.status == 200
    await response.content.readany()
    response.close()


async def ledger_when(server: AppServer | QPServer, done, seconds: float = 15.0) -> list[dict]:
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
    await leave_after_first_chunk(server, completion_request("script:left-1"))
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
    # So does the spend counter: the figure found, never the estimate as well.
    async with server.client.get("/metrics") as response:
        metrics = await response.text()
    spend = f'qp_spend_usd_total{{app="nwb-assistant",model="{CHEAP}",payer="server"}}'
    assert f"{spend} 0.0031\n" in metrics


async def test_an_app_paid_stream_is_looked_up_with_the_apps_key(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-2"] = long_stream("gen-left-2")
    fake.generations["gen-left-2"] = Generation(0.002, 10, 2)
    await leave_after_first_chunk(server, completion_request("script:left-2", "bids-assistant"))
    (row,) = await ledger_when(server, settled)
    assert (row["payer"], row["cost"], row["cost_source"]) == ("app", 0.002, "generation")
    assert ("gen-left-2", "Bearer bids-key", 200) in fake.lookups


async def test_lookups_still_owed_are_finished_after_a_restart(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-3"] = long_stream("gen-left-3")
    fake.generations["gen-left-3"] = Generation(0.0044, 30, 9)
    await leave_after_first_chunk(server, completion_request("script:left-3"))
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
    await leave_after_first_chunk(server, completion_request("script:left-4"))
    (row,) = await ledger_when(server, settled)
    assert (row["cost"], row["cost_source"], row["cost_owed_until"]) == (0.01, "estimate", None)
    assert {lookup[2] for lookup in fake.lookups if lookup[0] == "gen-left-4"} == {404}


async def test_nothing_is_owed_for_a_users_key_or_a_stream_without_an_id(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["left-5"] = long_stream("gen-left-5")
    fake.scripts["no-id"] = Script(chunks=[(0.0, b": OPENROUTER PROCESSING\n\n"), (30.0, b"")])
    await leave_after_first_chunk(
        server, completion_request("script:left-5"), headers={"x-openrouter-key": "user-key"}
    )
    await leave_after_first_chunk(server, completion_request("script:no-id"))
    rows = await ledger_when(server, lambda rows: len(rows) == 2)
    assert [
        (r["payer"], r["generation_id"], r["cost_source"], r["cost_owed_until"]) for r in rows
    ] == [
        ("user", "gen-left-5", "estimate", None),
        ("server", None, "estimate", None),
    ]


# --- a mixed run of real processes ------------------------------------------------------


async def read_tokens(response: aiohttp.ClientResponse, tokens: int) -> None:
    """Read the stream until `tokens` content chunks have come."""
    seen = b""
    while seen.count(b'"content"') < tokens:
        chunk = await response.content.readany()
        assert chunk, f"the stream ended after {seen!r}"
        seen += chunk


async def test_a_mixed_run_across_a_restart_costs_every_generation_at_what_was_billed(
    qp_server, fake
):
    """Completed streams, clients leaving mid-stream and before the first byte, upstream
    dying mid-stream, and a restart while lookups are owed: every generation the server saw
    is in the ledger at what the fake billed for it, and the budget counts the ledger."""
    fake.scripts.update(
        {
            "mixed-complete": billed_stream(5),
            "mixed-long": billed_stream(2, then=30.0),
            "mixed-dies": billed_stream(3, die=True),
            "mixed-silent": Script(headers_delay=30.0, billed=True),
        }
    )
    fake.lookups_paused = True  # nothing can be looked up before the restart
    before = len(fake.received)
    qp = qp_server(QP_OPENROUTER_URL=fake.url, QP_BUDGET_SERVER_DAILY_USD="5", **KEYS)

    async with aiohttp.ClientSession(qp.url) as http:

        async def complete(n: int) -> None:
            request = completion_request("script:mixed-complete")
            request["messages"].insert(0, {"role": "user", "content": "x" * (40 * n)})
            async with http.post("/api/completion", json=request) as response:
                assert response.status == 200
                assert (await response.read()).endswith(b"data: [DONE]\n\n")

        async def leave_mid_stream(app: str) -> None:
            response = await http.post(
                "/api/completion", json=completion_request("script:mixed-long", app)
            )
            assert response.status == 200
            await read_tokens(response, 2)
            response.close()

        async def upstream_dies() -> None:
            async with http.post(
                "/api/completion", json=completion_request("script:mixed-dies")
            ) as got:
                assert got.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended
                    await got.read()

        async def leave_before_the_first_byte() -> None:
            seen = len(fake.received)
            request = asyncio.ensure_future(
                http.post("/api/completion", json=completion_request("script:mixed-silent"))
            )
            assert await asyncio.to_thread(fake.wait_for, lambda: len(fake.received) > seen)
            request.cancel()

        await asyncio.gather(
            *(complete(n) for n in range(1, 4)),
            leave_mid_stream("nwb-assistant"),
            leave_mid_stream("bids-assistant"),
            upstream_dies(),
        )
        await leave_before_the_first_byte()

    def owed(rows: list[dict]) -> list[dict]:
        return [row for row in rows if row["cost_owed_until"] is not None]

    rows = await ledger_when(qp, lambda rows: len(rows) == 7 and len(owed(rows)) == 3)
    qp.stop()
    assert len(owed(ledger(qp))) == 3  # still owed, and still estimates, across the stop
    fake.lookups_paused = False
    qp.start()
    rows = await ledger_when(qp, lambda rows: len(rows) == 7 and settled(rows), 30.0)

    ours = fake.received[before:]
    sent = {seen.generation_id for seen in ours if seen.sent}
    assert {row["generation_id"] for row in rows} - {None} == sent
    billed = {gen: fake.generations[gen] for gen in sent}
    for row in rows:
        if row["generation_id"] is not None:
            bill = billed[row["generation_id"]]
            assert (row["cost"], row["prompt_tokens"], row["completion_tokens"]) == (
                pytest.approx(bill.total_cost),
                bill.tokens_prompt,
                bill.tokens_completion,
            )
    with_id = sum(row["cost"] for row in rows if row["generation_id"] is not None)
    assert with_id == pytest.approx(sum(bill.total_cost for bill in billed.values()))
    assert sorted((row["outcome"], row["payer"], row["cost_source"]) for row in rows) == [
        ("client_left", "app", "generation"),
        ("client_left", "server", "estimate"),  # left before the first byte: no id
        ("client_left", "server", "generation"),
        ("completed", "server", "stream"),
        ("completed", "server", "stream"),
        ("completed", "server", "stream"),
        ("upstream_died", "server", "generation"),
    ]
    (unanswered,) = [row for row in rows if row["generation_id"] is None]
    assert (unanswered["cost"], unanswered["status"]) == (0.01, 0)

    async with aiohttp.ClientSession(qp.url) as http:
        _, report = await call(http, "GET", "/api/usage", headers={"x-admin-key": ADMIN_KEY})
    server_paid = sum(row["cost"] for row in rows if row["payer"] == "server")
    (budget,) = report["budgets"]
    assert (budget["spent"], budget["reserved"]) == (pytest.approx(server_paid), 0)
    assert report["overall"]["cost"] == pytest.approx(with_id + 0.01)
