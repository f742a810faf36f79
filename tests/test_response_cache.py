"""The response cache and single-flight: the widget's ping paid once, the ledger's cache
rows, what is never cached, the TTL on an injected clock, identical requests in flight
sharing one upstream request; the app on a real port, processes for SIGHUP and for two
processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from qp.completions.flights import FLIGHTS
from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import STANDARD_STREAM, FakeOpenRouter, Script
from tests.helpers import (
    ADMIN_KEY,
    a_fresh_hour,
    call,
    completion_request,
    ledger,
    relay_process,
    wait_for_log,
    wait_until,
)
from tests.processes import PostgresServer, QPServer, SeaweedFS

CHEAP = "openai/gpt-4.1-mini"
WIDGET_PROMPT = (
    "You are the assistant of this site. "
    + completion_request()["systemMessage"]
    + " Answer questions about the site's datasets."
)
CACHE_ON = "[cache]\nttl_seconds = 600\n"
ADMIN = {"x-admin-key": ADMIN_KEY}
USER_KEY = {"x-openrouter-key": "the-users-key"}
WHOLE = b"".join(STANDARD_STREAM)


def ping(content: str = "ping", **fields) -> dict:
    """What the widget sends on every page load: a real completion saying `content`."""
    return completion_request(content, app="widget-site", systemMessage=WIDGET_PROMPT, **fields)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def cached_server(
    start_server: StartServer, fake: FakeOpenRouter, tmp_path, policy: str = CACHE_ON, **env
) -> AppServer:
    config = tmp_path / "qp.toml"
    config.write_text(policy)
    return await start_server(
        QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="server-key", QP_CONFIG=str(config), **env
    )


async def answer(http, request: dict, headers=None) -> tuple[int, str | None, bytes]:
    async with http.post("/api/completion", json=request, headers=headers) as response:
        return response.status, response.headers.get("X-QP-Cache"), await response.read()


async def rows_written(server: AppServer | QPServer, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while len(rows := ledger(server)) < count:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    return rows


def asked(fake: FakeOpenRouter, since: int, content: str = "ping") -> int:
    """Requests upstream got since `since` whose last message says `content`."""
    return sum(seen.body["messages"][-1]["content"] == content for seen in fake.received[since:])


# --- hits ---------------------------------------------------------------------------------


@pytest.mark.on_both_databases
async def test_the_widgets_ping_20_times_reaches_upstream_once(start_server, fake, tmp_path):
    server = await cached_server(start_server, fake, tmp_path)
    before = len(fake.received)
    answers = [await answer(server.client, ping()) for _ in range(20)]
    assert answers == [(200, "miss", WHOLE)] + [(200, "hit", WHOLE)] * 19
    assert asked(fake, before) == 1
    rows = await rows_written(server, 20)
    paid, *hits = rows
    assert (paid["payer"], paid["outcome"], paid["cost"], paid["cost_source"]) == (
        "server",
        "completed",
        0.00042,
        "stream",
    )
    assert [
        (row["outcome"], row["status"], row["cost"], row["cost_source"], row["saved_cost"])
        for row in hits
    ] == [("cached", 200, 0.0, "cache", 0.00042)] * 19
    # A hit looks nothing up: no generation id, nothing owed.
    assert all(row["generation_id"] is None and row["cost_owed_until"] is None for row in hits)
    status, spend = await call_json(server.client, "/api/admin/spend?days=1")
    assert status == 200
    assert spend["cache"] == {
        "hits": 19,
        "saved": pytest.approx(19 * 0.00042),
        "apps": [
            {
                "app": "widget-site",
                "hits": 19,
                "completions": 20,
                "hitRate": 0.95,
                "saved": pytest.approx(19 * 0.00042),
            }
        ],
    }
    async with server.client.get("/metrics") as response:
        text = await response.text()
    # Each a stored answer replayed, or (PostgreSQL: while it is being stored) the ended
    # flight's.
    hits = re.findall(r'qp_response_cache_hits_total\{kind="(?:stored|in_flight)"\} (\S+)', text)
    assert sum(float(count) for count in hits) == 19
    assert "qp_response_cache_misses_total 1.0" in text
    assert f"qp_response_cache_replayed_bytes_total {19 * len(WHOLE)}.0" in text
    assert f"qp_response_cache_stored_bytes_total {len(WHOLE)}.0" in text


async def call_json(http, path: str) -> tuple[int, dict]:
    async with http.get(path, headers=ADMIN) as response:
        return response.status, await response.json()


async def test_a_hit_needs_no_budget_room_and_counts_against_the_rate_limit(
    start_server, fake, tmp_path
):
    server = await cached_server(
        start_server,
        fake,
        tmp_path,
        QP_BUDGET_SERVER_DAILY_USD="0.0005",
        QP_BUDGET_DEFAULT_RESERVE_USD="0.0004",
        QP_RATE_LIMIT_COMPLETION="4/hour",
    )
    await a_fresh_hour()
    assert (await answer(server.client, ping("budget")))[:2] == (200, "miss")
    # 0.00042 spent: no room for another reservation, but a hit needs none.
    status, _, _ = await answer(server.client, ping("other"))
    assert status == 402
    assert (await answer(server.client, ping("budget")))[:2] == (200, "hit")
    assert (await answer(server.client, ping("budget")))[:2] == (200, "hit")
    assert (await answer(server.client, ping("budget")))[0] == 429


@pytest.mark.parametrize("fields", [{"model": "openai/gpt-5-nano"}, {"tools": [{"a": 1}]}])
async def test_any_other_field_that_reaches_upstream_is_another_answer(
    start_server, fake, tmp_path, fields
):
    server = await cached_server(start_server, fake, tmp_path)
    before = len(fake.received)
    assert (await answer(server.client, ping("fields")))[1] == "miss"
    assert (await answer(server.client, ping("fields", **fields)))[1] == "miss"
    assert (await answer(server.client, ping("fields", **fields)))[1] == "hit"
    other_app = completion_request("fields", app="other-site", systemMessage=WIDGET_PROMPT)
    assert (await answer(server.client, other_app))[1] == "miss"
    assert asked(fake, before, "fields") == 3


async def test_a_user_key_request_is_never_cached_nor_served_from_the_cache(
    start_server, fake, tmp_path
):
    server = await cached_server(start_server, fake, tmp_path)
    before = len(fake.received)
    assert await answer(server.client, ping("mine"), USER_KEY) == (200, "miss", WHOLE)
    assert await answer(server.client, ping("mine"), USER_KEY) == (200, "miss", WHOLE)
    assert (await answer(server.client, ping("mine")))[1] == "miss"  # not the user's answer
    assert await answer(server.client, ping("mine"), USER_KEY) == (200, "miss", WHOLE)
    assert asked(fake, before, "mine") == 4


@pytest.mark.parametrize(
    "script",
    [
        Script(chunks=[(0.0, STANDARD_STREAM[0]), (0.0, STANDARD_STREAM[1])], die=True),
        Script(chunks=[(0.0, chunk) for chunk in STANDARD_STREAM[:-2]]),  # no usage, no end
        Script(
            chunks=[
                (0.0, b'data: {"id":"gen-e","error":{"message":"overloaded"}}\n\n'),
                (0.0, STANDARD_STREAM[4]),
            ]
        ),
        Script(status=502, body=b"{}"),
    ],
    ids=["cut", "no usage", "error event", "upstream 502"],
)
async def test_a_cut_or_failed_stream_is_never_stored(start_server, fake, tmp_path, script):
    server = await cached_server(start_server, fake, tmp_path, QP_UPSTREAM_RETRIES="0")
    fake.scripts["broken"] = script
    before = len(fake.received)
    for _ in range(2):
        async with server.client.post("/api/completion", json=ping("script:broken")) as response:
            assert response.headers.get("X-QP-Cache", "miss") == "miss"
            with contextlib_suppress():
                await response.read()
    assert asked(fake, before, "script:broken") == 2


class contextlib_suppress:
    """A cut stream's read raises; what the client got does not matter here."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is aiohttp.ClientPayloadError


async def test_an_answer_over_the_entry_bound_is_not_stored(start_server, fake, tmp_path):
    server = await cached_server(start_server, fake, tmp_path, QP_RESPONSE_CACHE_ENTRY_KB="1")
    big = b'data: {"id":"gen-big","choices":[{"delta":{"content":"' + b"x" * 2000 + b'"}}]}\n\n'
    fake.scripts["big"] = Script(chunks=[(0.0, big), *[(0.0, c) for c in STANDARD_STREAM[4:]]])
    before = len(fake.received)
    assert (await answer(server.client, ping("script:big")))[1] == "miss"
    assert (await answer(server.client, ping("script:big")))[1] == "miss"
    assert asked(fake, before, "script:big") == 2


async def test_the_ttl_expires_on_the_injected_clock(start_server, fake, tmp_path):
    clock = Clock()
    policy = '[cache]\napp_ttl_seconds = { "widget-site" = 60 }\n'
    server = await cached_server(start_server, fake, tmp_path, policy, clock=clock)
    before = len(fake.received)
    assert (await answer(server.client, ping("ttl")))[1] == "miss"
    clock.offset += 59
    assert (await answer(server.client, ping("ttl")))[1] == "hit"
    clock.offset += 1.5
    assert (await answer(server.client, ping("ttl")))[1] == "miss"
    assert (await answer(server.client, ping("ttl")))[1] == "hit"
    assert asked(fake, before, "ttl") == 2
    # Another app has no TTL of its own, and none for all: not cached.
    other = completion_request("ttl", app="other-site")
    assert [(await answer(server.client, other))[1] for _ in range(2)] == ["miss", "miss"]


async def test_sighup_turns_the_cache_on(tmp_path, fake):
    server, config = relay_process(tmp_path, fake.url, "")
    server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            assert [(await answer(http, ping("hup")))[1] for _ in range(2)] == ["miss", "miss"]
            config.write_text(CACHE_ON)
            server.signal(signal.SIGHUP)
            await wait_for_log(server, "policy reloaded")
            assert [(await answer(http, ping("hup")))[1] for _ in range(2)] == ["miss", "hit"]
    finally:
        server.stop()
    assert "Traceback" not in server.log()


async def test_two_processes_on_postgresql_share_hits(
    tmp_path, fake, postgres: PostgresServer, seaweed: SeaweedFS, shared_bucket: str
):
    config = tmp_path / "qp.toml"
    config.write_text(CACHE_ON)
    shared = {
        "QP_DATABASE": postgres.create_database(),
        **seaweed.server_env(shared_bucket, "response-cache"),
        "QP_CONFIG": str(config),
        "QP_OPENROUTER_URL": fake.url,
        "OPENROUTER_API_KEY": "k",
    }
    one = QPServer(tmp_path / "one", shared).start()
    two = QPServer(tmp_path / "two", shared)
    try:
        two.start()
        before = len(fake.received)
        async with aiohttp.ClientSession(one.url) as http:
            assert await answer(http, ping("shared")) == (200, "miss", WHOLE)
        async with aiohttp.ClientSession(two.url) as http:
            assert await answer(http, ping("shared")) == (200, "hit", WHOLE)
        async with aiohttp.ClientSession(one.url) as http:
            assert await answer(http, ping("shared")) == (200, "hit", WHOLE)
        assert asked(fake, before, "shared") == 1
    finally:
        one.stop()
        two.stop()


# --- single-flight ------------------------------------------------------------------------


def gated_stream(gate: threading.Event) -> Script:
    """The standard stream, held after its first two chunks until `gate` is set."""
    return Script(
        chunks=[
            (0.0, STANDARD_STREAM[0]),
            (0.0, STANDARD_STREAM[1]),
            (0.0, b"GATE"),
            *[(0.0, chunk) for chunk in STANDARD_STREAM[2:]],
        ],
        gate=gate,
    )


@pytest.mark.on_both_databases
async def test_50_identical_requests_at_once_make_one_upstream_request(
    start_server, fake, tmp_path
):
    server = await cached_server(start_server, fake, tmp_path)
    gate = threading.Event()
    fake.scripts["flight"] = gated_stream(gate)
    before = len(fake.received)
    try:
        responses = await asyncio.gather(
            *(server.client.post("/api/completion", json=ping("script:flight")) for _ in range(50))
        )
        assert sorted(r.headers["X-QP-Cache"] for r in responses) == ["hit"] * 49 + ["miss"]
        first = STANDARD_STREAM[0] + STANDARD_STREAM[1]
        for response in responses:
            assert await response.content.readexactly(len(first)) == first
        # Ten followers leave before the end: the stream goes on for the others.
        leaving = [r for r in responses if r.headers["X-QP-Cache"] == "hit"][:10]
        for response in leaving:
            response.close()
        await asyncio.sleep(0)
    finally:
        gate.set()
    staying = [r for r in responses if r not in leaving]
    rest = b"".join(STANDARD_STREAM[2:])
    for response in staying:
        assert await response.read() == rest
        response.close()
    assert asked(fake, before, "script:flight") == 1
    assert fake.received[-1].disconnected is None
    rows = await rows_written(server, 50)
    paid = [row for row in rows if row["cost_source"] == "stream"]
    hits = [row for row in rows if row["cost_source"] == "cache"]
    assert [(row["outcome"], row["cost"]) for row in paid] == [("completed", 0.00042)]
    outcomes = sorted(row["outcome"] for row in hits)
    assert len(hits) == 49 and set(outcomes) <= {"cached", "client_left"}
    assert outcomes.count("cached") >= 39
    # What a hit saved is the answer's cost, once known (not to one that left before).
    assert {row["saved_cost"] for row in hits if row["outcome"] == "cached"} == {0.00042}
    # Stored as well: the next one is a hit without upstream.
    assert (await answer(server.client, ping("script:flight")))[:2] == (200, "hit")
    assert asked(fake, before, "script:flight") == 1


async def test_the_last_client_leaving_a_flight_aborts_upstream(start_server, fake, tmp_path):
    server = await cached_server(start_server, fake, tmp_path)
    gate = threading.Event()
    fake.scripts["abandoned"] = gated_stream(gate)
    before = len(fake.received)
    try:
        responses = await asyncio.gather(
            *(
                server.client.post("/api/completion", json=ping("script:abandoned"))
                for _ in range(3)
            )
        )
        for response in responses:
            await response.content.readany()
            response.close()
        seen = fake.received[before]
        deadline = time.monotonic() + 10
        while seen.disconnected is None:
            assert time.monotonic() < deadline, "upstream still streaming for nobody"
            await asyncio.sleep(0.05)
    finally:
        gate.set()
    rows = await rows_written(server, 3)
    (paid,) = [row for row in rows if row["cost_source"] != "cache"]
    assert (paid["outcome"], paid["client_left"]) == ("client_left", 1)
    # Nothing was stored: the next one goes upstream.
    fake.scripts["abandoned"] = Script()
    assert (await answer(server.client, ping("script:abandoned")))[1] == "miss"


async def test_a_request_arriving_as_a_flights_last_client_leaves_gets_a_whole_answer(
    start_server, fake, tmp_path
):
    """The last client leaves while the flight waits to try upstream again: the flight is
    cancelled, and an identical request arriving at that moment must not join it (it
    would get a 200 with nothing in it) but go upstream on its own."""
    server = await cached_server(start_server, fake, tmp_path)
    url = URL(server.url)
    for n in range(5):
        name = f"doomed-{n}"
        retry_later = Script(status=502, body=b"{}", headers={"Retry-After": "1"})
        fake.scripts[name] = Script(failures=[retry_later])
        before = len(fake.received)
        body = orjson.dumps(ping(f"script:{name}"))
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            b"POST /api/completion HTTP/1.1\r\nHost: qp\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await wait_until(
            lambda tried=before + 1: len(fake.received) >= tried, 10, "the first try upstream"
        )
        writer.transport.abort()  # its only client leaves during the backoff
        status, _, got = await answer(server.client, ping(f"script:{name}"))
        assert (status, got) == (200, WHOLE)


async def test_a_lone_client_reading_slower_than_upstream_gets_the_whole_stream(
    start_server, fake, tmp_path
):
    """Alone in its flight, a slow reader is held back as the relay holds it (upstream is
    not read faster than it writes), not cut for falling behind."""
    server = await cached_server(start_server, fake, tmp_path, QP_RESPONSE_CACHE_ENTRY_KB="16")
    token = b'data: {"id":"gen-l","choices":[{"delta":{"content":"' + b"w" * 4000 + b'"}}]}\n\n'
    fake.scripts["long"] = Script(
        chunks=[(0.0, token)] * 1000 + [(0.0, chunk) for chunk in STANDARD_STREAM[4:]]
    )
    whole = token * 1000 + b"".join(STANDARD_STREAM[4:])
    async with server.client.post(
        "/api/completion", json=ping("script:long"), read_bufsize=4096
    ) as response:
        got = bytearray()
        while chunk := await response.content.read(16384):
            got += chunk
            await asyncio.sleep(0.002)  # a slow reader's pace, not a wait for anything
    assert bytes(got) == whole
    (paid,) = await rows_written(server, 1)
    assert (paid["outcome"], paid["client_left"]) == ("completed", 0)


async def test_every_client_of_a_failed_flight_has_its_row(start_server, fake, tmp_path):
    server = await cached_server(start_server, fake, tmp_path, QP_UPSTREAM_RETRIES="0")
    gate = threading.Event()
    fake.scripts["held-503"] = Script(status=503, body=b"{}", gate=gate)
    flights = server.app[FLIGHTS]
    try:
        asked = [
            asyncio.ensure_future(
                call(server.client, "POST", "/api/completion", json=ping("script:held-503"))
            )
            for _ in range(3)
        ]
        # All three follow the one flight upstream holds, then it answers 503.
        await wait_until(
            lambda: sum(len(flight.followers) for flight in flights.by_key.values()) == 3,
            10,
            "three clients in the flight",
        )
    finally:
        gate.set()
    answers = await asyncio.gather(*asked)
    assert answers == [(503, {"error": "Service Unavailable"})] * 3
    rows = await rows_written(server, 3)
    assert (
        sorted((row["status"], row["outcome"], row["cost"]) for row in rows)
        == [(503, "upstream_error", None)] * 3
    )


async def test_a_database_down_under_a_flight_is_the_contracts_503_for_each_client(
    start_server, fake, tmp_path
):
    """The reservation in a budget fails (PostgreSQL down): each client of the flight gets
    503 Storage unavailable, as without the cache; never a 200 with nothing in it."""
    own = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-pg-flight-"))).start()
    try:
        server = await cached_server(
            start_server,
            fake,
            tmp_path,
            QP_DATABASE=own.create_database(),
            QP_BUDGET_SERVER_DAILY_USD="100",
        )
        own.stop("immediate")
        answers = await asyncio.gather(
            *(call(server.client, "POST", "/api/completion", json=ping("down")) for _ in range(3))
        )
        assert answers == [(503, {"error": "Storage unavailable"})] * 3
    finally:
        own.stop()
        shutil.rmtree(own.data_dir, ignore_errors=True)
