"""Running it for real: graceful shutdown, /healthz, /metrics, and the request log."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import aiohttp
import pytest

from qp.metrics import Metrics
from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, a_fresh_minute, call, completion_request, make_chat
from tests.processes import SeaweedFS


@pytest.fixture
def fake():
    fake = FakeOpenRouter().start()
    yield fake
    fake.stop()


# --- graceful shutdown ---------------------------------------------------------------------


async def test_sigterm_lets_a_stream_in_flight_finish_and_exits_0(qp_server, fake):
    fake.scripts["slow"] = Script(
        chunks=[(0.0, b"data: one\n\n"), (1.5, b"data: two\n\n"), (0.0, b"data: [DONE]\n\n")]
    )
    server = qp_server(QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="k")
    async with aiohttp.ClientSession(server.url) as http:
        response = await http.post(
            "/api/completion", json=completion_request("script:slow", "ops-app")
        )
        assert await response.content.readany() == b"data: one\n\n"
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # No new connections once it is stopping...
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
            pass
        # ...but the stream in flight runs to its end.
        assert await response.read() == b"data: two\n\ndata: [DONE]\n\n"
    assert await asyncio.to_thread(server.process.wait, 10) == 0
    assert "Traceback" not in server.log()


async def test_sigterm_cuts_streams_still_open_after_the_shutdown_timeout(qp_server, fake):
    fake.scripts["endless"] = Script(chunks=[(0.0, b"data: one\n\n")], hold=60.0)
    server = qp_server(QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="k", QP_SHUTDOWN_TIMEOUT="1")
    async with aiohttp.ClientSession(server.url) as http:
        response = await http.post(
            "/api/completion", json=completion_request("script:endless", "ops-app")
        )
        await response.content.readany()
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.process.wait, 15) == 0
        assert time.monotonic() - started < 8
        response.close()


# --- /healthz --------------------------------------------------------------------------------


async def test_healthz_is_ok_when_database_and_store_answer(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})


async def test_healthz_names_a_blob_folder_that_is_gone(qp_server):
    server = qp_server()
    blobs = server.data_dir / "blobs"
    blobs.rename(server.data_dir / "blobs.gone")
    blobs.write_text("not a folder")
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(http, "GET", "/healthz") == (
            503,
            {
                "error": "Service unavailable",
                "status": "unavailable",
                "checks": {"database": "ok", "storage": "unavailable"},
            },
        )


async def test_healthz_is_503_while_seaweedfs_is_stopped(qp_server, tmp_path):
    weed = SeaweedFS(tmp_path / "weed").start()
    try:
        server = qp_server(**weed.server_env(weed.create_bucket()))
        async with aiohttp.ClientSession(server.url) as http:
            assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
            weed.stop()
            status, body = await call(http, "GET", "/healthz")
            assert status == 503
            assert body["checks"] == {"database": "ok", "storage": "unavailable"}
            weed.start()
            assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
    finally:
        weed.stop()


# --- /metrics --------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit("} ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def test_metrics_count_requests_streams_errors_refusals_and_spend(qp_server, fake):
    server = qp_server(
        QP_OPENROUTER_URL=fake.url,
        OPENROUTER_API_KEY="k",
        OPENROUTER_API_KEY_PAID_APP="paid",
        QP_RATE_LIMIT_CHATS="2/minute",
    )
    fake.scripts["hold"] = Script(chunks=[(0.0, b"data: one\n\n")], hold=30.0)
    fake.scripts["401"] = Script(status=401, body=b"{}")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        await call(http, "GET", "/api/chats/nothing")
        await call(http, "GET", "/api/chats/nothing")
        await call(http, "GET", "/api/chats/nothing")  # the third is refused
        async with http.post("/api/completion", json=completion_request(app="paid-app")) as r:
            await r.read()
        await call(
            http, "POST", "/api/completion", json=completion_request("script:401", "ops-app")
        )
        held = await http.post("/api/completion", json=completion_request("script:hold", "ops-app"))
        await held.content.readany()
        async with http.get("/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
        held.close()
    route = "/api/chats/{chat_id}"
    assert metric(text, "qp_requests_total", route=route, method="GET", status="404") == 2
    assert metric(text, "qp_requests_total", route=route, method="GET", status="429") == 1
    assert metric(text, "qp_request_duration_seconds_count", route=route, method="GET") == 3
    assert metric(text, "qp_open_streams") == 1
    assert metric(text, "qp_upstream_errors_total", kind="upstream_error") == 1
    assert metric(text, "qp_rate_limit_refusals_total", rate_class="chats", reason="minute") == 1
    assert (
        metric(text, "qp_completion_tokens_total", app="paid-app", payer="app", kind="prompt") == 12
    )
    assert (
        metric(text, "qp_completion_tokens_total", app="paid-app", payer="app", kind="completion")
        == 3
    )
    assert metric(text, "qp_completion_cost_usd_total", app="paid-app", payer="app") == 0.00042


async def test_relay_overhead_leaves_out_upstreams_waits_and_reaches_the_access_log(
    qp_server, fake
):
    server = qp_server(QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="k")
    # Upstream waits 0.4 s before its headers and 0.4 s more before its first chunk.
    fake.scripts["slow"] = Script(headers_delay=0.4, chunks=[(0.4, b"data: one\n\n")])
    async with aiohttp.ClientSession(server.url) as http:
        # Refused before upstream: no overhead to observe.
        refused = completion_request("hi", "ops-app", model="anthropic/claude-sonnet-4")
        assert (await call(http, "POST", "/api/completion", json=refused))[0] == 400
        started = time.monotonic()
        request = completion_request("script:slow", "ops-app")
        async with http.post("/api/completion", json=request) as response:
            assert (response.status, await response.read()) == (200, b"data: one\n\n")
        took = time.monotonic() - started
        async with http.get("/metrics") as response:
            text = await response.text()
    assert metric(text, "qp_relay_overhead_seconds_count") == 1
    overhead = metric(text, "qp_relay_overhead_seconds_sum")
    assert took > 0.8
    assert 0 < overhead < took - 0.8
    server.stop()
    lines = [
        line for line in server.log().splitlines() if " qp.access POST /api/completion" in line
    ]
    assert len(lines) == 2, server.log()
    assert " 400 " in lines[0] and "overhead_ms=" not in lines[0]
    logged = float(re.search(r" overhead_ms=([0-9.]+)$", lines[1]).group(1))
    assert logged == pytest.approx(overhead * 1000, abs=0.001)


# --- the request log ---------------------------------------------------------------------------


async def test_json_logs_are_one_object_a_line_without_secrets(qp_server, fake):
    server = qp_server(
        QP_LOG_FORMAT="json", QP_OPENROUTER_URL=fake.url, OPENROUTER_API_KEY="sk-server-secret"
    )
    async with aiohttp.ClientSession(server.url) as http:
        chat_id = (
            await call(
                http,
                "POST",
                "/api/chats",
                json={"chat": make_chat(messages=[{"role": "user", "content": "SECRET-WORDS"}])},
            )
        )[1]["chatId"]
        await call(http, "GET", "/api/chats?app=x", headers={"x-admin-key": ADMIN_KEY})
        async with http.post(
            "/api/completion",
            json=completion_request("MORE-SECRET-WORDS", "ops-app"),
            headers={"x-openrouter-key": "sk-user-secret"},
        ) as response:
            await response.read()
    server.stop()
    log = server.log()
    for secret in ("SECRET-WORDS", chat_id, ADMIN_KEY, "sk-server-secret", "sk-user-secret"):
        assert secret not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "qp.access"]
    assert [(e["method"], e["route"], e["status"]) for e in access] == [
        ("POST", "/api/chats", 200),
        ("GET", "/api/chats", 200),
        ("POST", "/api/completion", 200),
    ]
    for entry in access:
        assert set(entry) >= {"time", "method", "route", "status", "duration_ms", "bytes"}
        assert re.fullmatch(r"[0-9a-f]{64}", entry["client"])


# --- hostile inputs, and who may read /metrics ---------------------------------------------


@pytest.mark.parametrize(
    "since", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-13-01", "\x00"]
)
async def test_a_since_no_date_in_utc_can_be_is_400(qp_server, since):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(
            http, "GET", "/api/usage", params={"since": since}, headers={"x-admin-key": ADMIN_KEY}
        ) == (400, {"error": "Invalid since parameter"})


async def test_metrics_need_the_token_when_one_is_set(qp_server):
    server = qp_server(QP_METRICS_TOKEN="scrape-secret")
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(http, "GET", "/metrics") == (401, {"error": "Unauthorized"})
        wrong = {"Authorization": "Bearer nope"}
        assert await call(http, "GET", "/metrics", headers=wrong) == (
            401,
            {"error": "Unauthorized"},
        )
        right = {"Authorization": "Bearer scrape-secret"}
        async with http.get("/metrics", headers=right) as response:
            assert response.status == 200
            assert "qp_requests_total" in await response.text()


@pytest.mark.parametrize(
    "header", ["X-Forwarded-For", "Forwarded", "X-Real-IP", "CF-Connecting-IP"]
)
async def test_without_a_token_metrics_refuse_anything_a_proxy_forwarded(qp_server, header):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        assert await call(http, "GET", "/metrics", headers={header: "203.0.113.7"}) == (
            403,
            {"error": "Forbidden"},
        )


def test_metrics_of_a_million_apps_stay_small():
    metrics = Metrics()
    for n in range(1_000_000):
        app = f"app-{n}-" + "x" * 90
        metrics.tokens_relayed(app, "server", 10, 5)
        metrics.cost_settled(app, "m", "server", 0.001)
    text = metrics.render()
    assert len(text) < 2**20, len(text)
    assert b'app="other"' in text
    assert text.count(b"qp_completion_cost_usd_total{") == 101  # 100 apps and `other`
