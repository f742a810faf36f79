"""Text checked at the door, and a data error never taken for an outage: every client string
that reaches a column (or goes upstream) is refused with the contract's 400 when it holds a
NUL, a lone surrogate or bytes that are not UTF-8, alike on SQLite and PostgreSQL; a value
the database still refuses is a 400 for a request and costs a background batch only the
row that holds it, counted in /metrics."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from qp.errors import StorageUnavailable, UnstorableValue
from qp.middlewares import error_answer
from qp.spend.ledger import LEDGER, insert_records
from qp.spend.record import CompletionRecord
from qp.storage.database import DATABASE
from tests.app_server import AppServer
from tests.helpers import ADMIN_KEY, call, completion_request, create, ledger, make_chat

pytestmark = pytest.mark.on_both_databases

NUL = "evil\x00model"
ADMIN = {"x-admin-key": ADMIN_KEY}


@pytest.fixture
async def relay(start_server, fake) -> AppServer:
    return await start_server(QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="server-key")


async def post_raw(http, path: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    async with http.request(
        method, path, data=body, headers={"Content-Type": "application/json"}
    ) as response:
        return response.status, await response.json()


def chat_bytes(model: bytes = b'"m"', chat_id: str = "") -> bytes:
    """A create body with `model` as raw JSON bytes (to carry escapes and bytes an encoder
    would not write)."""
    id_part = f'"chatId": "{chat_id}", '.encode() if chat_id else b""
    return (
        b'{"chat": {' + id_part + b'"app": "text", "model": ' + model + b', "messages": [],'
        b' "totalUsage": {"promptTokens": 1, "completionTokens": 2, "estimatedCost": 0.5}}}'
    )


# --- chats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("model", NUL, "Invalid chat data"),
        ("app", "evil\x00app", "Invalid app"),
        ("chatId", "evil\x00id", "Invalid chat id"),
    ],
)
async def test_a_nul_in_a_chats_stored_text_is_400_and_nothing_is_stored(
    server, field, value, error
):
    chat = make_chat("nul-" + field, app="nul-app")
    chat[field] = value
    assert await call(server.client, "POST", "/api/chats", json={"chat": chat}) == (
        400,
        {"error": error},
    )
    assert server.database.rows("SELECT chat_id FROM chats") == []


async def test_a_nul_in_an_updated_model_is_400_and_the_chat_is_unchanged(server):
    chat_id = await create(server.client, make_chat(app="nul-update", model="first"))
    chat = make_chat(chat_id, app="nul-update", model=NUL)
    assert await call(server.client, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}) == (
        400,
        {"error": "Invalid chat data"},
    )
    status, stored = await call(server.client, "GET", f"/api/chats/{chat_id}")
    assert (status, stored["model"]) == (200, "first")


@pytest.mark.parametrize(
    "model",
    [b'"\\ud800"', b'"a\\udfffb"', b'"\xff"', b'"\xed\xa0\x80"', b'"\xc3"'],
    ids=["lone-high", "lone-low", "byte-ff", "encoded-surrogate", "cut-short"],
)
async def test_a_lone_surrogate_or_bytes_not_utf8_are_an_invalid_json_body(server, model):
    """JSON text is UTF-8 (RFC 8259); a lone surrogate has no UTF-8 form, so a body
    holding one is no JSON the server takes, wherever it stands."""
    assert await post_raw(server.client, "/api/chats", chat_bytes(model)) == (
        400,
        {"error": "Invalid JSON body"},
    )
    assert await post_raw(
        server.client, "/api/chats/x", chat_bytes(model, chat_id="x"), method="PUT"
    ) == (400, {"error": "Invalid JSON body"})


async def test_a_lone_surrogate_in_a_title_or_a_message_is_an_invalid_json_body(server):
    body = chat_bytes().replace(b'"messages": []', b'"title": "\\ud83d", "messages": []')
    assert await post_raw(server.client, "/api/chats", body) == (
        400,
        {"error": "Invalid JSON body"},
    )
    body = chat_bytes().replace(b'"messages": []', b'"messages": [{"content": "x\\udc00"}]')
    assert await post_raw(server.client, "/api/chats", body) == (
        400,
        {"error": "Invalid JSON body"},
    )


async def test_a_nul_in_message_text_and_title_is_user_text_and_kept_as_sent(server):
    messages = [{"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "\x00"}]
    chat = {**make_chat(app="nul-text", messages=messages), "title": "t\x00"}
    chat_id = await create(server.client, chat)
    status, stored = await call(server.client, "GET", f"/api/chats/{chat_id}")
    assert (status, stored["messages"]) == (200, messages)
    assert server.backend.read_blob(server.blob_key_of(chat_id)) == (
        b'[{"role":"user","content":"a\\u0000b"},{"role":"assistant","content":"\\u0000"}]'
    )


@pytest.mark.parametrize("app", ["%00", "a%00b"])
async def test_a_nul_in_the_listed_app_is_400_invalid_app(server, app):
    assert await call(server.client, "GET", f"/api/chats?app={app}", headers=ADMIN) == (
        400,
        {"error": "Invalid app"},
    )
    assert await call(server.client, "GET", f"/api/usage?app={app}", headers=ADMIN) == (
        400,
        {"error": "Invalid app"},
    )


# --- completions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"model": NUL}, "Invalid completion request"),
        ({"provider": "Cere\x00bras"}, "Invalid completion request"),
        ({"app": "evil\x00app"}, "Invalid app"),
    ],
    ids=["model", "provider", "app"],
)
async def test_a_nul_in_a_completions_stored_text_is_400_and_never_sent(
    relay, fake, changes, error
):
    sent = len(fake.received)
    request = {**completion_request(), **changes}
    status, body = await call(
        relay.client, "POST", "/api/completion", json=request, headers={"x-openrouter-key": "k"}
    )
    assert (status, body) == (400, {"error": error})
    assert len(fake.received) == sent
    await relay.app[LEDGER].flush()
    assert ledger(relay) == []


@pytest.mark.parametrize("field", ["model", "systemMessage", "provider", "app"])
async def test_a_lone_surrogate_in_a_completion_is_an_invalid_json_body(relay, fake, field):
    body = bytearray(b'{"model": "m", "systemMessage": "s", "messages": [], "app": "a"}')
    if field == "provider":
        body[-1:] = b', "provider": "p"}'
    at = body.index(f'"{field}": "'.encode()) + len(field) + 5
    body[at:at] = b"\\ud800"
    assert await post_raw(relay.client, "/api/completion", bytes(body)) == (
        400,
        {"error": "Invalid JSON body"},
    )


async def test_a_nul_in_message_text_goes_upstream_as_json_escapes(relay, fake):
    request = {**completion_request(), "messages": [{"role": "user", "content": "a\x00b"}]}
    async with relay.client.post("/api/completion", json=request) as response:
        assert response.status == 200
        await response.read()
    assert fake.last().body["messages"][1] == {"role": "user", "content": "a\x00b"}


async def test_20_good_completions_and_a_nul_model_one_leave_20_good_ledger_rows(relay):
    headers = {"x-openrouter-key": "user-key"}

    async def send(model: str) -> int:
        request = {**completion_request(), "model": model}
        async with relay.client.post("/api/completion", json=request, headers=headers) as answer:
            await answer.read()
            return answer.status

    statuses = await asyncio.gather(
        *(send(f"good/model-{n}") for n in range(10)),
        send(NUL),
        *(send(f"good/model-{n}") for n in range(10, 20)),
    )
    assert statuses == [200] * 10 + [400] + [200] * 10
    await relay.app[LEDGER].flush()
    rows = ledger(relay)
    assert sorted(row["model"] for row in rows) == sorted(f"good/model-{n}" for n in range(20))


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

    request = make_mocked_request("POST", "/anywhere", app=server.app)
    with caplog.at_level(logging.WARNING, "qp.middlewares"):
        try:
            await insert_records(db, [bad])
        except UnstorableValue as refused:
            response = error_answer(request, refused)
    assert isinstance(response, web.Response)
    assert (response.status, response.body) == (400, b'{"error":"Bad request"}')
    assert "refused a value" in caplog.text and "bad" not in caplog.text
