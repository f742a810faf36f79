"""Rate limits, blocks that survive restarts, and whose address counts, on the real server."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from qp.protection.rate_limits import RATE_LIMITER
from tests.helpers import ADMIN_KEY, a_fresh_hour, a_fresh_minute, call, make_chat
from tests.processes import QPServer

ADMIN = {"x-admin-key": ADMIN_KEY}


async def create(http, headers=None):
    return await call(http, "POST", "/api/chats", json={"chat": make_chat()}, headers=headers)


def per_minute(limit: int, window: str = "minute") -> dict:
    retry = 60 if window == "minute" else 3600
    return {
        "error": "Rate limit exceeded",
        "retryAfter": retry,
        "message": f"Rate limit exceeded: {limit} requests per {window}",
    }


async def test_over_the_minute_limit_is_429_with_retry_after(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="3/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(3):
            assert (await create(http))[0] == 200
        async with http.post("/api/chats", json={"chat": make_chat()}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "60"
            assert await response.json() == per_minute(3)
        # GET one and PUT share the class.
        assert await call(http, "GET", "/api/chats/abc") == (429, per_minute(3))


async def test_over_the_hour_limit_says_so(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="100/minute,2/hour")
    await a_fresh_hour()
    async with aiohttp.ClientSession(server.url) as http:
        assert [(await create(http))[0] for _ in range(2)] == [200, 200]
        async with http.post("/api/chats", json={"chat": make_chat()}) as response:
            assert response.headers["Retry-After"] == "3600"
            assert (response.status, await response.json()) == (
                429,
                per_minute(2, "hour"),
            )


async def test_the_completion_class_is_counted_apart(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute", QP_RATE_LIMIT_COMPLETION="2/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        assert (await create(http))[0] == 200
        assert (await create(http))[0] == 429
        # Not limited yet: the body is checked (and refused) next.
        assert await call(http, "POST", "/api/completion", json={}) == (
            400,
            {"error": "Invalid completion request"},
        )
        assert (await call(http, "POST", "/api/completion", json={}))[0] == 400
        assert await call(http, "POST", "/api/completion", json={}) == (429, per_minute(2))


async def test_the_rate_limit_comes_before_the_size_check(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        assert (await create(http))[0] == 200
        huge = b"x" * (11 * 1024 * 1024)
        assert (await call(http, "POST", "/api/chats", data=huge))[0] == 429


async def test_admin_routes_are_not_limited(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        await create(http)
        assert (await create(http))[0] == 429
        for _ in range(5):
            assert (await call(http, "GET", "/api/chats?app=test-app", headers=ADMIN))[0] == 200
            assert (await call(http, "DELETE", "/api/chats/x", headers=ADMIN))[0] == 200
            assert (await call(http, "GET", "/api/usage", headers=ADMIN))[0] == 200


async def test_off_turns_a_class_off(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="off")
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(50):
            assert (await call(http, "GET", "/api/chats/none"))[0] == 404


BLOCKED = "IP blocked due to excessive violations"


async def test_ten_refusals_block_the_client_for_a_day_even_across_a_restart(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        assert (await create(http))[0] == 200
        for _ in range(10):
            assert await create(http) == (429, per_minute(1))
        status, body = await create(http)
        assert status == 429
        assert body["error"] == "Rate limit exceeded" and body["message"] == BLOCKED
        assert 86_000 < body["retryAfter"] <= 86_400
        # Blocked for every limited route, not only the class that was abused.
        assert (await call(http, "POST", "/api/completion", json={}))[1]["message"] == BLOCKED
    server.restart()
    async with (
        aiohttp.ClientSession(server.url) as http,
        http.get("/api/chats/abc") as response,
    ):
        body = await response.json()
        assert response.status == 429
        assert body["message"] == BLOCKED
        assert response.headers["Retry-After"] == str(body["retryAfter"])
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        (client_hash, until), *others = db.execute("SELECT client_hash, blocked_until FROM blocks")
    assert others == []
    left = datetime.fromisoformat(until) - datetime.now(UTC)
    assert timedelta(hours=23, minutes=50) < left <= timedelta(hours=24)
    assert re.fullmatch(r"[0-9a-f]{64}", client_hash)
    assert "127.0.0.1" not in (server.data_dir / "qp.sqlite3").read_bytes().decode("latin-1")


async def test_addresses_are_hashed_with_qp_ip_salt(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute", QP_IP_SALT="pepper")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(12):
            await create(http)
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        ((client_hash,),) = db.execute("SELECT client_hash FROM blocks")
    assert client_hash == hashlib.sha256(b"pepper\x00127.0.0.1").hexdigest()


async def test_each_installation_has_its_own_salt(qp_server):
    hashes = []
    for name in ("one", "two"):
        server = qp_server(name, QP_RATE_LIMIT_CHATS="1/minute")
        await a_fresh_minute()
        async with aiohttp.ClientSession(server.url) as http:
            for _ in range(12):
                await create(http)
        with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
            ((client_hash,),) = db.execute("SELECT client_hash FROM blocks")
            ((salt,),) = db.execute("SELECT value FROM settings WHERE name = 'ip_salt'")
        assert len(salt) >= 32
        assert client_hash == hashlib.sha256(f"{salt}\x00127.0.0.1".encode()).hexdigest()
        hashes.append(client_hash)
    assert hashes[0] != hashes[1]
    # What an installation without a salt of its own would store.
    assert hashlib.sha256(b"\x00127.0.0.1").hexdigest() not in hashes


# --- whose address counts ---------------------------------------------------------------


async def allowed(http, headers: dict) -> bool:
    """One GET under a 1/minute limit: True when this client had not used its request."""
    status, _ = await call(http, "GET", "/api/chats/x", headers=headers)
    return status == 404


def xff(value: str) -> dict:
    return {"X-Forwarded-For": value}


async def test_a_trusted_proxy_forwards_the_client_address(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute")  # 127.0.0.1 is trusted
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        assert await allowed(http, xff("203.0.113.7"))
        assert not await allowed(http, xff("203.0.113.7"))
        assert await allowed(http, xff("203.0.113.8"))
        # The right-most address that is not a trusted proxy is the client.
        assert await allowed(http, xff("198.51.100.1, 203.0.113.9, 127.0.0.1"))
        assert not await allowed(http, xff("198.51.100.2, 203.0.113.9"))
        assert await allowed(http, {"CF-Connecting-IP": "192.0.2.44"})
        assert not await allowed(http, {"CF-Connecting-IP": "192.0.2.44"})
        # No header: the proxy's own address.
        assert await allowed(http, {})
        assert not await allowed(http, {})


@pytest.mark.parametrize("trusted", ["", "10.0.0.0/8, 192.168.1.1"])
async def test_an_untrusted_peers_forwarded_headers_are_ignored(qp_server, trusted):
    server = qp_server(QP_RATE_LIMIT_CHATS="1/minute", QP_TRUSTED_PROXIES=trusted)
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        assert await allowed(http, xff("203.0.113.7"))
        assert not await allowed(http, xff("203.0.113.8"))
        assert not await allowed(http, {"CF-Connecting-IP": "192.0.2.44"})


async def test_a_peer_on_the_unix_socket_is_trusted(tmp_path):
    server = QPServer(
        tmp_path / "qp", {"QP_RATE_LIMIT_CHATS": "1/minute"}, unix_socket=tmp_path / "qp.sock"
    ).start()
    try:
        connector = aiohttp.UnixConnector(path=str(tmp_path / "qp.sock"))
        await a_fresh_minute()
        async with aiohttp.ClientSession("http://qp", connector=connector) as http:
            assert await allowed(http, xff("203.0.113.7"))
            assert not await allowed(http, xff("203.0.113.7"))
            assert await allowed(http, xff("203.0.113.8"))
    finally:
        server.stop()


@pytest.mark.on_both_databases
async def test_the_counts_kept_are_bounded_and_the_least_recent_go_first(
    start_server, database_name
):
    server = await start_server(QP_RATE_LIMIT_CHATS="2/hour", QP_RATE_LIMIT_CLIENTS="100")
    await a_fresh_hour()
    for n in range(400):  # a flood from 400 addresses, each counted once
        address = {"X-Forwarded-For": f"10.0.{n // 256}.{n % 256}"}
        assert (await call(server.client, "GET", "/api/chats/x", headers=address))[0] == 404
    limiter = server.app[RATE_LIMITER]
    if database_name == "postgres":
        # 100 rounded up to whole buckets of 16: 7 buckets.
        (kept,) = server.database.rows("SELECT COUNT(*) AS n FROM rate_counts")
        assert 0 < kept["n"] <= 112
    else:
        assert limiter.tracked == 100
    assert limiter.forgotten >= 400 - 112
    # The most recent client is still counted: its second request is its last this hour.
    latest = {"X-Forwarded-For": "10.0.1.143"}
    assert (await call(server.client, "GET", "/api/chats/x", headers=latest))[0] == 404
    assert await call(server.client, "GET", "/api/chats/x", headers=latest) == (
        429,
        per_minute(2, "hour"),
    )
