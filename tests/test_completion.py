"""POST /api/completion, the app in-process (a process where its exit or log matters), against
a fake OpenRouter on a real port."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from qp.policy.policy import DEFAULT_REQUIRED_PHRASE_GROUPS
from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import STANDARD_STREAM, FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, SYSTEM, call, completion_request, ledger
from tests.processes import QPServer

pytestmark = pytest.mark.on_both_databases

CHEAP = "openai/gpt-4.1-mini"
EXPENSIVE = "anthropic/claude-sonnet-4"
KEYS = {
    "OPENROUTER_API_KEY": "server-key",
    "OPENROUTER_API_KEY_BIDS_ASSISTANT": "bids-key",
}


async def start_relay(start_server: StartServer, fake: FakeOpenRouter, **env: str) -> AppServer:
    """The app in-process, relaying to `fake` with the server's and an app's keys."""
    return await start_server(QP_OPENROUTER_URL=fake.url, **KEYS, **env)


def start_process(tmp_path_factory, fake: FakeOpenRouter, **env: str) -> QPServer:
    """`server.py` as a process, for what only a process shows: its exit and its log."""
    return QPServer(
        tmp_path_factory.mktemp("qp-completion"),
        {"ADMIN_KEY": ADMIN_KEY, "QP_OPENROUTER_URL": fake.url, **KEYS, **env},
    ).start()


@pytest.fixture
async def relay_server(fake, start_server) -> AppServer:
    return await start_relay(start_server, fake)


@pytest.fixture
async def http(relay_server) -> TestClient:
    return relay_server.client


async def stream(http: aiohttp.ClientSession, request: dict, headers=None) -> tuple[int, bytes]:
    async with http.post("/api/completion", json=request, headers=headers) as response:
        return response.status, await response.read()


# --- the relay ------------------------------------------------------------------------


async def test_stream_is_relayed_byte_for_byte_with_streaming_headers(http, fake):
    async with http.post("/api/completion", json=completion_request("hello")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert await response.read() == b"".join(STANDARD_STREAM)


async def test_upstream_gets_the_contract_body_and_the_servers_key(http, fake):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    request = completion_request(
        "hello",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tools=tools,
        app="stan-assistant",
    )
    assert (await stream(http, request))[0] == 200
    seen = fake.last()
    assert seen.headers["Authorization"] == "Bearer server-key"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "model": CHEAP,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ],
        "stream": True,
        "tools": tools,
        "usage": {"include": True},
    }


@pytest.mark.parametrize("tools", [None, "absent"])
async def test_tools_default_to_an_empty_list(http, fake, tools):
    request = completion_request("hello")
    if tools is None:
        request["tools"] = None
    assert (await stream(http, request))[0] == 200
    assert fake.last().body["tools"] == []


async def test_provider_becomes_only_that_provider(http, fake):
    assert (await stream(http, completion_request("hello", provider="Cerebras")))[0] == 200
    assert fake.last().body["provider"] == {"only": ["Cerebras"]}


async def test_no_provider_sends_no_provider(http, fake):
    assert (await stream(http, completion_request("hello")))[0] == 200
    assert "provider" not in fake.last().body


# --- whose key pays ---------------------------------------------------------------------


async def test_the_users_key_wins_even_for_a_cheap_model(http, fake):
    status, _ = await stream(http, completion_request("hello"), {"x-openrouter-key": "user-key"})
    assert status == 200
    assert fake.last().headers["Authorization"] == "Bearer user-key"


async def test_an_expensive_model_with_the_users_key_goes_through(http, fake):
    status, _ = await stream(
        http, completion_request("hello", model=EXPENSIVE), {"x-openrouter-key": "user-key"}
    )
    assert status == 200
    assert fake.last().headers["Authorization"] == "Bearer user-key"
    assert fake.last().body["model"] == EXPENSIVE


async def test_a_cheap_model_uses_the_apps_own_key(http, fake):
    assert (await stream(http, completion_request("hello", app="bids-assistant")))[0] == 200
    assert fake.last().headers["Authorization"] == "Bearer bids-key"


async def test_a_cheap_model_without_an_app_key_uses_the_servers_key(http, fake):
    assert (await stream(http, completion_request("hello", app="nwb-assistant")))[0] == 200
    assert fake.last().headers["Authorization"] == "Bearer server-key"


async def test_an_expensive_model_without_a_key_is_400_and_never_sent(http, fake):
    before = len(fake.received)
    assert await call(
        http, "POST", "/api/completion", json=completion_request("hello", model=EXPENSIVE)
    ) == (
        400,
        {"error": f"OpenRouter key required for model: {EXPENSIVE}"},
    )
    assert len(fake.received) == before


async def test_no_key_configured_is_500(fake, start_server):
    server = await start_server(QP_OPENROUTER_URL=fake.url)
    assert await call(
        server.client, "POST", "/api/completion", json=completion_request("hello")
    ) == (
        500,
        {"error": "API key not configured"},
    )


async def test_cheap_models_come_from_qp_cheap_models(fake, start_server):
    server = await start_relay(start_server, fake, QP_CHEAP_MODELS="vendor/tiny, vendor/small")
    try:
        async with aiohttp.ClientSession(server.url) as http:
            assert (await stream(http, completion_request("hello", model="vendor/small")))[0] == 200
            assert fake.last().headers["Authorization"] == "Bearer server-key"
            assert await call(
                http, "POST", "/api/completion", json=completion_request("hello", model=CHEAP)
            ) == (
                400,
                {"error": f"OpenRouter key required for model: {CHEAP}"},
            )
    finally:
        await server.stop()


# --- validation, in the contract's order -------------------------------------------------


async def test_malformed_json_is_400(http):
    assert await call(
        http, "POST", "/api/completion", data=b"{nope", headers={"Content-Type": "text/plain"}
    ) == (400, {"error": "Invalid JSON body"})


INVALID_REQUESTS = {
    "not an object": [],
    "no model": completion_request("hello", leave_out=("model",)),
    "model a number": completion_request("hello", model=4),
    "no system message": completion_request("hello", leave_out=("systemMessage",)),
    "system message null": completion_request("hello", systemMessage=None),
    "messages an object": completion_request("hello", messages={"role": "user"}),
    "tools an object": completion_request("hello", tools={"type": "function"}),
    "tools a string": completion_request("hello", tools="search"),
}


@pytest.mark.parametrize("body", INVALID_REQUESTS.values(), ids=INVALID_REQUESTS.keys())
async def test_invalid_completion_request_is_400(http, body):
    assert await call(http, "POST", "/api/completion", json=body) == (
        400,
        {"error": "Invalid completion request"},
    )


async def test_body_over_500_kib_is_413(http, fake):
    before = len(fake.received)
    body = orjson.dumps(completion_request("a" * (500 * 1024)))
    status, answer = await call(
        http, "POST", "/api/completion", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert answer == {
        "error": "Request validation failed",
        "message": f"Request body too large: {len(body) / 1024:.1f} KB (max: 500.0 KB)",
    }
    assert len(fake.received) == before


async def test_more_than_50_messages_is_413(http):
    messages = [{"role": "user", "content": "x"}] * 51
    assert await call(
        http, "POST", "/api/completion", json=completion_request("hello", messages=messages)
    ) == (
        413,
        {"error": "Request validation failed", "message": "Too many messages: 51 (max: 50)"},
    )


async def test_exactly_50_messages_and_100000_characters_are_accepted(http):
    messages = [{"role": "user", "content": "x"}] * 49 + [
        {"role": "user", "content": "y" * 100_000}
    ]
    assert (await stream(http, completion_request("hello", messages=messages)))[0] == 200


async def test_a_message_over_100000_characters_is_413(http):
    # Characters, not bytes: 100,001 two-byte characters are over, at 200 KB of body.
    body = orjson.dumps(completion_request("é" * 100_001))
    assert await call(
        http, "POST", "/api/completion", data=body, headers={"Content-Type": "application/json"}
    ) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Message 0 too large: 100001 characters (max: 100000)",
        },
    )


async def test_the_413_names_the_first_message_too_large_in_javascript_length(http):
    # JavaScript counts a character beyond U+FFFF as two: 50,001 of them are 100,002.
    messages = [
        {"role": "user", "content": "short"},
        {"role": "assistant", "content": "\U0001f600" * 50_001},
        {"role": "user", "content": "z" * 100_001},
    ]
    body = orjson.dumps(completion_request("hello", messages=messages))
    headers = {"Content-Type": "application/json"}
    assert await call(http, "POST", "/api/completion", data=body, headers=headers) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Message 1 too large: 100002 characters (max: 100000)",
        },
    )


async def test_text_parts_are_summed_against_the_limit(http):
    parts = [{"type": "text", "text": "a" * 50_000}, {"type": "image_url", "image_url": {}}]
    parts.append({"type": "text", "text": "b" * 50_001})
    request = completion_request("hello", messages=[{"role": "user", "content": parts}])
    status, answer = await call(http, "POST", "/api/completion", json=request)
    assert status == 413
    assert answer["message"] == "Message 0 too large: 100001 characters (max: 100000)"


@pytest.mark.parametrize("missing_group", range(3))
async def test_a_system_message_missing_a_phrase_group_is_400(http, fake, missing_group):
    system = " ".join(
        group[0] for i, group in enumerate(DEFAULT_REQUIRED_PHRASE_GROUPS) if i != missing_group
    )
    before = len(fake.received)
    assert await call(
        http, "POST", "/api/completion", json=completion_request("hello", systemMessage=system)
    ) == (
        400,
        {"error": "First message must contain the correct system message"},
    )
    assert len(fake.received) == before


async def test_the_second_phrase_of_a_group_also_passes(http):
    groups = DEFAULT_REQUIRED_PHRASE_GROUPS
    system = f"{groups[0][0]}\n{groups[1][1]}\n{groups[2][0]}"
    assert (await stream(http, completion_request("hello", systemMessage=system)))[0] == 200


async def test_the_key_check_comes_before_the_phrase_check(http):
    request = completion_request("hello", model=EXPENSIVE, systemMessage="no phrases")
    assert (await call(http, "POST", "/api/completion", json=request))[1] == {
        "error": f"OpenRouter key required for model: {EXPENSIVE}"
    }


# --- timing and clients that leave ------------------------------------------------------


async def test_the_first_chunk_reaches_the_client_before_upstream_sends_the_second(http, fake):
    fake.scripts["paced"] = Script(chunks=[(0.0, b"data: one\n\n"), (1.0, b"data: two\n\n")])
    async with http.post("/api/completion", json=completion_request("script:paced")) as response:
        first = await response.content.readany()
        first_at = time.monotonic()
        rest = await response.read()
    second_sent_at = fake.last().sent[1][0]
    assert first == b"data: one\n\n"
    assert rest == b"data: two\n\n"
    assert first_at < second_sent_at


async def test_a_client_leaving_before_the_first_byte_aborts_upstream(http, fake):
    fake.scripts["slow-start"] = Script(headers_delay=30.0)
    before = len(fake.received)
    request = http.post("/api/completion", json=completion_request("script:slow-start"))
    task = asyncio.ensure_future(request)
    assert await asyncio.to_thread(fake.wait_for, lambda: len(fake.received) > before)
    task.cancel()
    left_at = time.monotonic()
    seen = fake.received[before]
    assert await asyncio.to_thread(fake.wait_for, lambda: seen.disconnected is not None, 2.0)
    assert seen.disconnected - left_at < 1.0


async def test_a_client_leaving_mid_stream_aborts_upstream(relay_server, fake):
    fake.scripts["long"] = Script(chunks=[(0.0, b"data: one\n\n"), (30.0, b"data: two\n\n")])
    before = len(fake.received)
    async with aiohttp.ClientSession(relay_server.url) as http:
        response = await http.post("/api/completion", json=completion_request("script:long"))
        assert await response.content.readany() == b"data: one\n\n"
        response.close()
        left_at = time.monotonic()
    seen = fake.received[before]
    assert await asyncio.to_thread(fake.wait_for, lambda: seen.disconnected is not None, 2.0)
    assert seen.disconnected - left_at < 1.0


# --- upstream failures ------------------------------------------------------------------


async def test_upstream_error_keeps_its_status_with_its_own_message(http, fake):
    fake.scripts["401"] = Script(
        status=401,
        body=b'{"error":{"message":"No auth credentials found","code":401}}',
    )
    assert await call(http, "POST", "/api/completion", json=completion_request("script:401")) == (
        401,
        {"error": "Unauthorized", "message": "No auth credentials found"},
    )


async def test_upstream_error_without_a_message_gives_the_reason_phrase(http, fake):
    fake.scripts["429"] = Script(status=429, body=b"slow down")
    assert await call(http, "POST", "/api/completion", json=completion_request("script:429")) == (
        429,
        {"error": "Too Many Requests"},
    )


@pytest.mark.parametrize("status", [301, 302, 307, 600, 999])
async def test_a_redirect_or_a_status_http_does_not_define_is_502(http, fake, status):
    fake.scripts[f"odd{status}"] = Script(status=status, body=b"{}")
    assert await call(
        http, "POST", "/api/completion", json=completion_request(f"script:odd{status}")
    ) == (
        502,
        {
            "error": "Bad Gateway",
            "message": f"The completion service answered with status {status}",
        },
    )


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["messages", "tools", "provider"])
async def test_a_request_nested_too_deep_to_send_upstream_is_400(http, fake, where):
    request = completion_request("hello")
    if where == "messages":
        request["messages"].append({"role": "user", "content": nested(300)})
    else:
        request[where] = nested(300) if where == "tools" else {"deep": nested(300)}
    sent = len(fake.received)
    assert await call(http, "POST", "/api/completion", json=request) == (
        400,
        {"error": "Invalid completion request"},
    )
    assert len(fake.received) == sent


@pytest.mark.parametrize("app", ["x" * 101, "line\nbreak", 42, ["a"]])
async def test_a_completion_for_an_invalid_app_is_400(http, fake, app):
    assert await call(
        http, "POST", "/api/completion", json=completion_request("hello", app=app)
    ) == (
        400,
        {"error": "Invalid app"},
    )


async def test_unreachable_upstream_is_502(start_server, caplog):
    fake = FakeOpenRouter()
    fake.port = 1  # nothing listens there
    server = await start_relay(start_server, fake)
    assert await call(
        server.client, "POST", "/api/completion", json=completion_request("hello")
    ) == (
        502,
        {"error": "Bad Gateway", "message": "Could not connect to the completion service"},
    )
    await server.stop()
    assert "cannot reach upstream" in caplog.text
    assert "Traceback" not in caplog.text


# The wait for the first byte and the silence allowed mid-stream are two settings: each test
# sets the other one long, so that a relay using one for both fails one of them.


async def test_no_first_byte_in_time_is_504(start_server, fake):
    server = await start_relay(
        start_server, fake, QP_UPSTREAM_TIMEOUT="1", QP_UPSTREAM_IDLE_TIMEOUT="30"
    )
    fake.scripts["late"] = Script(headers_delay=5.0)
    started = time.monotonic()
    assert await call(
        server.client, "POST", "/api/completion", json=completion_request("script:late")
    ) == (
        504,
        {
            "error": "Gateway Timeout",
            "message": "The completion service did not answer within 1 s",
        },
    )
    assert time.monotonic() - started < 3


async def test_the_first_byte_timeout_does_not_cut_a_long_stream(start_server, fake):
    server = await start_relay(
        start_server, fake, QP_UPSTREAM_TIMEOUT="1", QP_UPSTREAM_IDLE_TIMEOUT="30"
    )
    chunks = [(0.0 if n == 0 else 0.5, f"data: {n}\n\n".encode()) for n in range(5)]
    fake.scripts["slow-but-steady"] = Script(chunks=chunks)
    status, body = await stream(server.client, completion_request("script:slow-but-steady"))
    assert (status, body) == (200, b"".join(chunk for _, chunk in chunks))


async def test_silence_mid_stream_ends_the_clients_stream(start_server, fake, caplog):
    server = await start_relay(
        start_server, fake, QP_UPSTREAM_TIMEOUT="30", QP_UPSTREAM_IDLE_TIMEOUT="1"
    )
    fake.scripts["stall"] = Script(chunks=[(0.0, b"data: one\n\n"), (10.0, b"data: two\n\n")])
    started = time.monotonic()
    async with server.client.post(
        "/api/completion", json=completion_request("script:stall")
    ) as response:
        assert await response.content.readany() == b"data: one\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert time.monotonic() - started < 4
    assert "upstream silent mid-stream" in caplog.text


async def test_upstream_dying_mid_stream_ends_the_clients_stream(http, fake, caplog):
    fake.scripts["die"] = Script(chunks=[(0.0, b"data: one\n\n")], die=True)
    started = time.monotonic()
    async with http.post("/api/completion", json=completion_request("script:die")) as response:
        assert await response.content.readany() == b"data: one\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert time.monotonic() - started < 3
    assert "upstream failed mid-stream" in caplog.text
    assert "Traceback" not in caplog.text


# --- the spend ledger ----------------------------------------------------------------------


async def test_each_completion_is_one_ledger_row_with_usage_and_payer(fake, start_server):
    server = await start_relay(start_server, fake)
    try:
        async with aiohttp.ClientSession(server.url) as http:
            await stream(http, completion_request("SECRET-QUESTION", app="bids-assistant"))
            await stream(http, completion_request("hello", app="nwb-assistant"))
            await stream(
                http, completion_request("hello", model=EXPENSIVE), {"x-openrouter-key": "user-key"}
            )
            fake.scripts["401b"] = Script(status=401, body=b"{}")
            await stream(http, completion_request("script:401b"))
            await call(
                http, "POST", "/api/completion", json=completion_request("hello", model=EXPENSIVE)
            )
    finally:
        await server.stop()
    # Rows are written in the background; a clean stop writes what is queued.
    rows = ledger(server)
    assert [(r["app"], r["model"], r["payer"], r["status"], r["outcome"]) for r in rows] == [
        ("bids-assistant", CHEAP, "app", 200, "completed"),
        ("nwb-assistant", CHEAP, "server", 200, "completed"),
        ("nwb-assistant", EXPENSIVE, "user", 200, "completed"),
        ("nwb-assistant", CHEAP, "server", 401, "upstream_error"),
    ]
    assert [(r["prompt_tokens"], r["completion_tokens"], r["cost"]) for r in rows[:3]] == [
        (12, 3, 0.00042)
    ] * 3
    assert rows[3]["cost"] is None
    assert all(r["duration_ms"] >= 0 and r["client_left"] == 0 for r in rows)
    stored = orjson.dumps(
        [server.database.rows(f"SELECT * FROM {table}") for table in ("completions", "chats")]
    )
    if server.database.postgres_url is None:
        stored += (server.data_dir / "qp.sqlite3").read_bytes()
    assert b"SECRET-QUESTION" not in stored
    assert b"bids-key" not in stored and b"user-key" not in stored


async def test_a_client_that_leaves_is_in_the_ledger(fake, start_server):
    server = await start_relay(start_server, fake)
    fake.scripts["long2"] = Script(chunks=[(0.0, b"data: one\n\n"), (30.0, b"data: two\n\n")])
    try:
        async with aiohttp.ClientSession(server.url) as http:
            response = await http.post("/api/completion", json=completion_request("script:long2"))
            await response.content.readany()
            response.close()
        assert await asyncio.to_thread(fake.wait_for, lambda: bool(ledger(server)), 3.0)
        (row,) = ledger(server)
    finally:
        await server.stop()
    assert (row["status"], row["outcome"], row["client_left"]) == (200, "client_left", 1)


async def test_usage_report_totals_by_app_model_and_payer(fake, start_server):
    server = await start_relay(start_server, fake)
    admin = {"x-admin-key": ADMIN_KEY}
    try:
        async with aiohttp.ClientSession(server.url) as http:
            for _ in range(2):
                await stream(http, completion_request("hello", app="bids-assistant"))
            await stream(http, completion_request("hello", app="nwb-assistant"))
            assert await call(http, "GET", "/api/usage") == (401, {"error": "Unauthorized"})
            status, report = await call(http, "GET", "/api/usage", headers=admin)
            assert status == 200
            assert report["totals"] == [
                {
                    "app": "bids-assistant",
                    "model": CHEAP,
                    "payer": "app",
                    "completions": 2,
                    "promptTokens": 24,
                    "completionTokens": 6,
                    "cost": pytest.approx(0.00084),
                    "clientLeft": 0,
                    "costSource": {"stream": 2, "generation": 0, "estimate": 0},
                },
                {
                    "app": "nwb-assistant",
                    "model": CHEAP,
                    "payer": "server",
                    "completions": 1,
                    "promptTokens": 12,
                    "completionTokens": 3,
                    "cost": pytest.approx(0.00042),
                    "clientLeft": 0,
                    "costSource": {"stream": 1, "generation": 0, "estimate": 0},
                },
            ]
            assert report["overall"]["completions"] == 3
            assert report["budgets"] == []  # none configured
            _, one_app = await call(http, "GET", "/api/usage?app=nwb-assistant", headers=admin)
            assert [row["app"] for row in one_app["totals"]] == ["nwb-assistant"]
            _, future = await call(http, "GET", "/api/usage?since=2999-01-01", headers=admin)
            assert future["totals"] == [] and future["since"] == "2999-01-01T00:00:00.000Z"
            _, past = await call(
                http, "GET", "/api/usage?since=2000-01-01T00:00:00Z", headers=admin
            )
            assert past["overall"]["completions"] == 3
            assert await call(http, "GET", "/api/usage?since=yesterday", headers=admin) == (
                400,
                {"error": "Invalid since parameter"},
            )
    finally:
        await server.stop()


def usage_line(prompt: object, completion_tokens: object, cost: object) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "cost": cost}
    return b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"


async def test_usage_the_ledger_cannot_store_is_null_and_the_ledger_goes_on(fake, tmp_path_factory):
    server = start_process(tmp_path_factory, fake, QP_SHUTDOWN_TIMEOUT="2")
    fake.scripts["huge"] = Script(chunks=[(0.0, usage_line(2**64 - 1, 2**64 - 1, 1.0))])
    fake.scripts["negative"] = Script(chunks=[(0.0, usage_line(-5, "7", -0.5))])
    admin = {"x-admin-key": ADMIN_KEY}
    async with aiohttp.ClientSession(server.url) as http:
        for script in ("huge", "negative"):
            await stream(http, completion_request(f"script:{script}", app="odd-usage"))
        for _ in range(3):
            await stream(http, completion_request("hello", app="odd-usage"))
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
        status, report = await call(http, "GET", "/api/usage?app=odd-usage", headers=admin)
    assert status == 200
    assert report["overall"] == {
        "completions": 5,
        "promptTokens": 36,
        "completionTokens": 9,
        # The stream whose usage could not be stored is costed at the estimate (0.01 USD,
        # the default reserve for a model without a price).
        "cost": pytest.approx(1.01126),
        "clientLeft": 0,
    }
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 2 + 5
    rows = ledger(server)
    assert [
        (r["prompt_tokens"], r["completion_tokens"], r["cost"], r["cost_source"]) for r in rows[:2]
    ] == [
        (None, None, 1.0, "stream"),
        (None, None, 0.01, "estimate"),
    ]
    log = server.log()
    assert "upstream reported a prompt_tokens the ledger cannot store" in log
    assert "Traceback" not in log


async def test_a_stream_cut_by_shutdown_is_recorded_as_shutdown(fake, tmp_path_factory):
    server = start_process(tmp_path_factory, fake, QP_SHUTDOWN_TIMEOUT="1")
    fake.scripts["forever"] = Script(chunks=[(0.0, b"data: one\n\n")], hold=60.0)
    async with aiohttp.ClientSession(server.url) as http:
        response = await http.post("/api/completion", json=completion_request("script:forever"))
        await response.content.readany()
        assert server.stop() == 0
        response.close()
    (row,) = ledger(server)
    assert (row["status"], row["outcome"], row["client_left"]) == (200, "shutdown", 0)
