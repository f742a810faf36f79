"""Retries, fallback models and the breakers, before the first byte only: the app on a real
port against the fake OpenRouter."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import pytest

from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import STANDARD_STREAM, FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, call, completion_request, ledger, wait_until

pytestmark = pytest.mark.on_both_databases

CHEAP = "openai/gpt-4.1-mini"
FALLBACK = "openai/gpt-5-nano"
SECOND_FALLBACK = "google/gemini-2.5-flash"
EXPENSIVE = "anthropic/claude-sonnet-4"
USER_KEY = {"x-openrouter-key": "the-users-key"}
ADMIN = {"x-admin-key": ADMIN_KEY}
FALLBACKS = f"""
[completion]
fallback_models = {{ "*" = ["{FALLBACK}", "{SECOND_FALLBACK}", "{EXPENSIVE}"] }}
"""


def failing(status: int, times: int, **fields) -> Script:
    """Answers `status` to its first `times` requests, then the standard stream."""
    return Script(failures=[Script(status=status, body=b"{}", **fields) for _ in range(times)])


async def relay(
    start_server: StartServer, fake: FakeOpenRouter, tmp_path, policy: str = "", **env
) -> AppServer:
    config = tmp_path / "qp.toml"
    config.write_text(policy)
    return await start_server(
        QP_OPENROUTER_URL=fake.url,
        OPENROUTER_API_KEY="server-key",
        QP_CONFIG=str(config),
        **env,
    )


async def stream(server: AppServer, request: dict, headers=None) -> tuple[int, bytes]:
    async with server.client.post("/api/completion", json=request, headers=headers) as response:
        return response.status, await response.read()


async def rows_written(server: AppServer, count: int) -> list[dict]:
    """The ledger once it holds `count` rows (they are written in the background)."""
    deadline = time.monotonic() + 10
    while len(rows := ledger(server)) < count:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    return rows


def seen_models(fake: FakeOpenRouter, since: int = 0) -> list[str]:
    return [seen.body["model"] for seen in fake.received[since:]]


async def test_two_502s_then_an_answer_is_one_clean_stream(start_server, fake, tmp_path):
    server = await relay(start_server, fake, tmp_path)
    fake.scripts["flaky"] = failing(502, 2)
    before = len(fake.received)
    assert await stream(server, completion_request("script:flaky")) == (
        200,
        b"".join(STANDARD_STREAM),
    )
    assert seen_models(fake, before) == [CHEAP] * 3
    (row,) = await rows_written(server, 1)
    assert (row["status"], row["outcome"], row["attempts"]) == (200, "completed", 3)
    assert (row["model"], row["answered_model"], row["cost"]) == (CHEAP, CHEAP, 0.00042)


async def test_a_429_is_tried_again_after_its_retry_after(start_server, fake, tmp_path):
    server = await relay(start_server, fake, tmp_path)
    fake.scripts["busy"] = failing(429, 1, headers={"Retry-After": "1"})
    before = len(fake.received)
    assert (await stream(server, completion_request("script:busy")))[0] == 200
    first, second = fake.received[before:]
    assert second.started - first.started >= 1.0


async def test_retries_stop_at_the_timeout_and_a_later_retry_after_is_not_waited_for(
    start_server, fake, tmp_path
):
    server = await relay(start_server, fake, tmp_path, QP_UPSTREAM_TIMEOUT="2")
    fake.scripts["later"] = failing(503, 5, headers={"Retry-After": "30"})
    before = len(fake.received)
    started = time.monotonic()
    assert await call(
        server.client, "POST", "/api/completion", json=completion_request("script:later")
    ) == (
        503,
        {"error": "Service Unavailable"},
    )
    assert time.monotonic() - started < 2
    assert len(fake.received) - before == 1


async def test_a_timeout_is_not_followed_by_another_attempt(start_server, fake, tmp_path):
    server = await relay(start_server, fake, tmp_path, QP_UPSTREAM_TIMEOUT="0.5")
    fake.scripts["slow"] = Script(headers_delay=2.0)
    before = len(fake.received)
    status, body = await call(
        server.client, "POST", "/api/completion", json=completion_request("script:slow")
    )
    assert (status, body["error"]) == (504, "Gateway Timeout")
    assert len(fake.received) - before == 1
    (row,) = await rows_written(server, 1)
    # Upstream may bill the request it never answered: its estimate stays the cost.
    assert (row["outcome"], row["attempts"], row["cost_source"]) == ("timeout", 1, "estimate")


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404])
async def test_a_request_upstream_calls_bad_is_not_tried_again(
    start_server, fake, tmp_path, status
):
    server = await relay(start_server, fake, tmp_path, FALLBACKS)
    fake.scripts[f"bad-{status}"] = Script(
        status=status, body=b'{"error": {"message": "no such thing"}}'
    )
    before = len(fake.received)
    got_status, body = await call(
        server.client, "POST", "/api/completion", json=completion_request(f"script:bad-{status}")
    )
    assert got_status == status and body["message"] == "no such thing"
    assert seen_models(fake, before) == [CHEAP]


async def test_a_model_that_always_fails_falls_back_to_the_next(start_server, fake, tmp_path):
    server = await relay(start_server, fake, tmp_path, FALLBACKS)
    fake.model_scripts[CHEAP] = Script(status=502, body=b"{}")
    fake.model_scripts[FALLBACK] = Script(status=429, body=b"{}")
    try:
        before = len(fake.received)
        assert await stream(server, completion_request("hello")) == (
            200,
            b"".join(STANDARD_STREAM),
        )
    finally:
        fake.model_scripts.clear()
    # Three tries each, then the second fallback answers; the expensive one is never asked.
    assert seen_models(fake, before) == [CHEAP] * 3 + [FALLBACK] * 3 + [SECOND_FALLBACK]
    (row,) = await rows_written(server, 1)
    assert (row["model"], row["answered_model"], row["attempts"]) == (CHEAP, SECOND_FALLBACK, 7)
    assert (row["status"], row["outcome"]) == (200, "completed")


async def test_a_user_key_request_is_tried_again_but_never_on_another_model(
    start_server, fake, tmp_path
):
    server = await relay(start_server, fake, tmp_path, FALLBACKS)
    fake.model_scripts[EXPENSIVE] = Script(status=503, body=b"{}")
    try:
        before = len(fake.received)
        status, _ = await stream(server, completion_request("hi", model=EXPENSIVE), USER_KEY)
    finally:
        fake.model_scripts.clear()
    assert status == 503
    assert seen_models(fake, before) == [EXPENSIVE] * 3
    assert all(
        seen.headers["Authorization"] == "Bearer the-users-key" for seen in fake.received[before:]
    )
    (row,) = await rows_written(server, 1)
    assert (row["answered_model"], row["attempts"], row["outcome"]) == (None, 3, "upstream_error")


async def test_a_failure_after_the_first_byte_is_not_tried_again(start_server, fake, tmp_path):
    server = await relay(start_server, fake, tmp_path, FALLBACKS)
    fake.scripts["cut"] = Script(chunks=[(0.0, STANDARD_STREAM[0])], die=True)
    before = len(fake.received)
    async with server.client.post(
        "/api/completion", json=completion_request("script:cut")
    ) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(fake.received) - before == 1
    (row,) = await rows_written(server, 1)
    assert (row["outcome"], row["attempts"]) == ("upstream_died", 1)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


BREAKER_OPEN = {
    "error": "Service Unavailable",
    "message": f"The completion service keeps failing for model {CHEAP}; it is tried again in 30 s",
}


async def test_the_breaker_opens_after_failures_in_a_row_and_closes_after_its_cooloff(
    start_server, fake, tmp_path
):
    clock = Clock()
    server = await relay(
        start_server,
        fake,
        tmp_path,
        QP_UPSTREAM_RETRIES="0",
        QP_BREAKER_FAILURES="2",
        QP_BREAKER_COOLOFF_SECONDS="30",
        clock=clock,
    )
    http = server.client
    fake.model_scripts[CHEAP] = Script(status=502, body=b"{}")
    try:
        before = len(fake.received)
        for _ in range(2):
            assert (await call(http, "POST", "/api/completion", json=completion_request()))[
                0
            ] == 502
        assert len(fake.received) - before == 2
        # Open: upstream is not asked, and health says which model is skipped.
        async with http.post("/api/completion", json=completion_request()) as response:
            assert (response.status, await response.json()) == (503, BREAKER_OPEN)
            assert response.headers["Retry-After"] == "30"
        assert len(fake.received) - before == 2
        assert await call(http, "GET", "/healthz") == (
            200,
            {"status": "ok", "openBreakers": {CHEAP: 30}},
        )
        status, overview = await call(http, "GET", "/api/admin/overview", headers=ADMIN)
        assert (status, overview["openBreakers"]) == (200, {CHEAP: 30})
        # A client's own key is not held back by the operator's breaker.
        assert (await stream(server, completion_request(), USER_KEY))[0] == 502
        clock.offset += 29
        assert (await call(http, "POST", "/api/completion", json=completion_request()))[0] == 503
        # After the cool-off one request goes through; it fails: open again at once.
        clock.offset += 1.5
        assert (await call(http, "POST", "/api/completion", json=completion_request()))[0] == 502
        assert (await call(http, "POST", "/api/completion", json=completion_request()))[0] == 503
        # The next one after the cool-off answers: closed.
        clock.offset += 31
        fake.model_scripts.clear()
        assert (await stream(server, completion_request()))[0] == 200
        assert (await stream(server, completion_request()))[0] == 200
        assert await call(http, "GET", "/healthz") == (200, {"status": "ok"})
    finally:
        fake.model_scripts.clear()
    rows = await rows_written(server, 9)
    assert [(row["outcome"], row["attempts"]) for row in rows if row["payer"] == "server"] == [
        ("upstream_error", 1),
        ("upstream_error", 1),
        ("breaker_open", 0),
        ("breaker_open", 0),
        ("upstream_error", 1),
        ("breaker_open", 0),
        ("completed", 1),
        ("completed", 1),
    ]


async def test_an_open_breaker_goes_straight_to_the_fallback(start_server, fake, tmp_path):
    server = await relay(
        start_server, fake, tmp_path, FALLBACKS, QP_UPSTREAM_RETRIES="0", QP_BREAKER_FAILURES="1"
    )
    fake.model_scripts[CHEAP] = Script(status=500, body=b"{}")
    try:
        assert (await stream(server, completion_request()))[0] == 200  # CHEAP, then FALLBACK
        before = len(fake.received)
        assert (await stream(server, completion_request()))[0] == 200
    finally:
        fake.model_scripts.clear()
    assert seen_models(fake, before) == [FALLBACK]
    async with server.client.get("/metrics") as response:
        text = await response.text()
    assert "qp_breaker_skips_total 1.0" in text
    assert 'qp_upstream_attempts_total{result="5xx"} 1.0' in text
    assert 'qp_upstream_attempts_total{result="answered"} 2.0' in text
    assert "qp_fallback_answers_total 2.0" in text
    assert f'qp_breaker_open_seconds{{model="{CHEAP}"}}' in text


async def test_no_attempt_starts_once_the_timeout_is_spent(start_server, fake, tmp_path):
    """The first model's error body never ends: its read is cut at the timeout, and the
    fallback is not asked, counted or charged (upstream bills no error answer)."""
    server = await relay(start_server, fake, tmp_path, FALLBACKS, QP_UPSTREAM_TIMEOUT="1")
    fake.model_scripts[CHEAP] = Script(status=502, stall_body=True)
    try:
        before = len(fake.received)
        status, body = await call(
            server.client, "POST", "/api/completion", json=completion_request()
        )
    finally:
        fake.model_scripts.clear()
    assert (status, body) == (502, {"error": "Bad Gateway"})
    assert seen_models(fake, before) == [CHEAP]
    (row,) = await rows_written(server, 1)
    assert (row["outcome"], row["attempts"], row["cost"]) == ("upstream_error", 1, None)
    assert await call(server.client, "GET", "/healthz") == (200, {"status": "ok"})


async def test_after_the_cooloff_one_request_alone_is_the_trial(start_server, fake, tmp_path):
    clock = Clock()
    server = await relay(
        start_server,
        fake,
        tmp_path,
        QP_UPSTREAM_RETRIES="0",
        QP_BREAKER_FAILURES="1",
        clock=clock,
        QP_UPSTREAM_TIMEOUT="30",
    )
    gate = threading.Event()
    fake.model_scripts[CHEAP] = Script(status=502, body=b"{}")
    try:
        assert (await call(server.client, "POST", "/api/completion", json=completion_request()))[
            0
        ] == 502
        clock.offset += 31
        fake.model_scripts[CHEAP] = Script(status=502, body=b"{}", gate=gate)
        before = len(fake.received)
        trial = asyncio.ensure_future(
            call(server.client, "POST", "/api/completion", json=completion_request())
        )
        await wait_until(lambda: len(fake.received) > before, 10, "the trial upstream")
        # While the trial is out, the others are still refused.
        others = [
            await call(server.client, "POST", "/api/completion", json=completion_request())
            for _ in range(3)
        ]
        assert [status for status, _ in others] == [503] * 3
        gate.set()
        assert (await trial)[0] == 502
    finally:
        gate.set()
        fake.model_scripts.clear()
    assert len(fake.received) - before == 1


@pytest.mark.parametrize("value", ["1_0", "nan", "1e9"])
async def test_a_retry_after_http_does_not_write_is_ignored(start_server, fake, tmp_path, value):
    server = await relay(start_server, fake, tmp_path)
    fake.scripts[f"odd-{value}"] = failing(429, 1, headers={"Retry-After": value})
    assert (await stream(server, completion_request(f"script:odd-{value}")))[0] == 200
