"""Text checked at the door, and a data error never taken for an outage: every client string
that reaches a column (or goes upstream) is refused with the contract's 400 when it holds a
NUL, a lone surrogate or bytes that are not UTF-8, alike on SQLite and PostgreSQL; a value
the database still refuses is a 400 for a request and costs a background batch only the
row that holds it, counted in /metrics."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from qp.appkeys import DATABASE, LEDGER
from qp.completions.ledger import insert_records
from qp.completions.usage import CompletionRecord
from qp.errors import StorageUnavailable, UnstorableValue
from qp.middlewares import errors
from tests.helpers import ledger

pytestmark = pytest.mark.on_both_databases

NUL = "evil\x00model"


# --- a value the database refuses -----------------------------------------------------------


def record(model: str, tokens: int | None = 5) -> CompletionRecord:
    return CompletionRecord(
        started_at="2026-12-01T10:00:00.000Z",
        app="ledger-app",
        model=model,
        payer="user",
        status=200,
        outcome="completed",
        prompt_tokens=tokens,
    )


def unstorable_records(database_name: str) -> dict[str, CompletionRecord]:
    """Rows the ledger's database cannot take: a lone surrogate, a number beyond 64 bits,
    and on PostgreSQL a NUL."""
    bad = {"surrogate": record("bad\ud800"), "huge-int": record("bad-int", 2**70)}
    if database_name == "postgres":
        bad["nul"] = record(NUL)
    return bad


async def test_a_value_the_database_refuses_is_a_data_error_not_an_outage(server, database_name):
    db = server.app[DATABASE]
    for bad in unstorable_records(database_name).values():
        with pytest.raises(UnstorableValue) as refused:
            await insert_records(db, [record("good"), bad])
        assert not isinstance(refused.value, StorageUnavailable)
        assert "bad" not in str(refused.value)
        # Reads too: a query with the value is refused the same way.
        query, value = (
            ("SELECT COUNT(*) FROM completions WHERE prompt_tokens = ?", bad.prompt_tokens)
            if bad.model == "bad-int"
            else ("SELECT COUNT(*) FROM completions WHERE model = ?", bad.model)
        )
        with pytest.raises(UnstorableValue):
            await db.fetchall(query, (value,))
    assert await db.fetchall("SELECT COUNT(*) FROM completions") == [(0,)]
    await insert_records(db, [record("good")])  # and the database serves on
    assert await db.fetchall("SELECT COUNT(*) FROM completions") == [(1,)]


async def test_a_ledger_batch_with_bad_rows_keeps_every_good_row_and_counts_the_drops(
    server, database_name, caplog
):
    bad = unstorable_records(database_name)
    writer = server.app[LEDGER]
    for n in range(30):
        writer.add(record(f"good-{n}"))
        if n % 10 == 5:
            writer.add(list(bad.values())[n // 10 % len(bad)])
    for one in bad.values():
        writer.add(one)
    with caplog.at_level(logging.ERROR, "qp.storage.batches"):
        await writer.flush()
    expected = 3 + len(bad)
    assert sorted(row["model"] for row in ledger(server)) == sorted(f"good-{n}" for n in range(30))
    async with server.client.get("/metrics") as response:
        metrics = await response.text()
    assert f'qp_batch_items_dropped_total{{batch="ledger",reason="refused"}} {expected}.0' in (
        metrics
    )
    assert 'qp_batch_items_dropped_total{batch="ledger",reason="unavailable"} 0.0' in metrics
    assert caplog.text.count("1 ledger rows dropped: Database refused a value") == expected
    assert "bad" not in caplog.text and "evil" not in caplog.text


async def test_a_refused_value_reaching_a_handler_is_a_400_logged_without_it(
    server, database_name, caplog
):
    db = server.app[DATABASE]
    bad = unstorable_records(database_name)["surrogate"]

    async def handler(request: web.Request) -> web.Response:
        await insert_records(db, [bad])
        return web.json_response({})

    request = make_mocked_request("POST", "/anywhere", app=server.app)
    with caplog.at_level(logging.WARNING, "qp.middlewares"):
        response = await errors(request, handler)
    assert isinstance(response, web.Response)
    assert (response.status, response.body) == (400, b'{"error":"Bad request"}')
    assert "refused a value" in caplog.text and "bad" not in caplog.text
