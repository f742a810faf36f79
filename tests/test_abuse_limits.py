"""Bounds an anonymous client cannot talk its way past: app names, the apps allow-list, the
daily storage quota, the total storage cap, admin-key guessing, IPv6 address rotation."""

from __future__ import annotations

import re
import subprocess
import sys

import aiohttp
import pytest

from qp.errors import ApiError
from qp.protection.admin import AdminGuard
from qp.protection.rate_limits import RateLimit, RateLimiter
from tests.helpers import (
    ADMIN_KEY,
    KILOBYTE_OF_MESSAGES,
    STORAGE_FULL,
    a_fresh_minute,
    call,
    create,
    make_chat,
    storage_cap,
)

pytestmark = pytest.mark.on_both_databases

INVALID_APP = (400, {"error": "Invalid app"})
UNKNOWN_APP = (400, {"error": "Unknown app"})


@pytest.mark.parametrize(
    "app", ["a" * 101, "tab\there", "line\nbreak", "nul\x00", "del\x7f", "next\x85line"]
)
async def test_an_app_name_not_of_printable_text_up_to_100_characters_is_400(qp_server, app):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        chat = make_chat(app=app)
        assert await call(http, "POST", "/api/chats", json={"chat": chat}) == INVALID_APP
        chat_id = await create(http, make_chat(app="fine"))
        changed = make_chat(chat_id, app=app)
        assert (
            await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": changed}) == INVALID_APP
        )


async def test_an_app_name_of_100_printable_characters_is_fine(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        assert await create(http, make_chat("hundred", app="ü" * 100)) == "hundred"


async def test_with_an_apps_allow_list_other_apps_are_400(qp_server):
    server = qp_server(QP_APPS="nwb-assistant,bids-assistant")
    async with aiohttp.ClientSession(server.url) as http:
        assert await create(http, make_chat("listed", app="bids-assistant")) == "listed"
        chat = make_chat(app="elsewhere")
        assert await call(http, "POST", "/api/chats", json={"chat": chat}) == UNKNOWN_APP
        assert await call(http, "POST", "/api/chats", json={"chat": make_chat(app="a" * 101)}) == (
            INVALID_APP
        )


async def test_a_client_over_its_daily_bytes_gets_429_until_midnight(qp_server):
    server = qp_server(QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY="3000")
    messages = ["x" * 990]  # stored as 996 bytes
    async with aiohttp.ClientSession(server.url) as http:
        chat_id = await create(http, make_chat(app="quota", messages=messages))
        await create(http, make_chat(app="quota", messages=messages))
        update = make_chat(chat_id, app="quota", messages=messages)
        assert (await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update}))[0] == 200
        async with http.post("/api/chats", json={"chat": make_chat(app="quota")}) as response:
            assert response.status == 429
            body = await response.json()
            retry_after = int(response.headers["Retry-After"])
        # Small as it is, the fourth write does not fit in what is left of 3000 bytes.
        assert body == {
            "error": "Storage quota exceeded",
            "retryAfter": retry_after,
            "message": "Chat storage quota exceeded: 2.9 KB per day",
        }
        assert 0 < retry_after <= 86400
        # What was refused was not stored.
        assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["messages"] == messages


async def test_over_the_total_storage_cap_writes_get_507_and_deletes_make_room(qp_server):
    server = qp_server(QP_MAX_TOTAL_STORAGE_GB=storage_cap(2500))
    messages = KILOBYTE_OF_MESSAGES
    admin = {"x-admin-key": ADMIN_KEY}
    async with aiohttp.ClientSession(server.url) as http:
        first = await create(http, make_chat(app="cap", messages=messages))
        await create(http, make_chat(app="cap", messages=messages))
        third = make_chat(app="cap", messages=messages)
        assert await call(http, "POST", "/api/chats", json={"chat": third}) == STORAGE_FULL
        assert (await call(http, "DELETE", f"/api/chats/{first}", headers=admin))[0] == 200
        assert (await call(http, "POST", "/api/chats", json={"chat": third}))[0] == 200


async def test_ten_wrong_admin_keys_in_a_minute_block_the_admin_routes_for_an_hour(qp_server):
    server = qp_server()
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(10):
            wrong = {"x-admin-key": "guess"}
            assert await call(http, "GET", "/api/chats?app=x", headers=wrong) == (
                401,
                {"error": "Unauthorized"},
            )
        async with http.get("/api/usage", headers={"x-admin-key": ADMIN_KEY}) as response:
            assert response.status == 429
            retry_after = int(response.headers["Retry-After"])
            assert await response.json() == {
                "error": "Rate limit exceeded",
                "retryAfter": retry_after,
                "message": "IP blocked due to excessive violations",
            }
        assert 3590 <= retry_after <= 3600
        # The public routes stay open to it.
        assert (await call(http, "GET", "/api/chats/nothing"))[0] == 404
    server.stop()
    assert len(re.findall("wrong admin keys within a minute", server.log())) == 1


def test_wrong_admin_keys_block_only_when_ten_fall_within_a_minute():
    now = [1000.0]
    guard = AdminGuard(clock=lambda: now[0])
    for _ in range(10):
        with pytest.raises(ApiError) as refused:
            guard.check("spread", "guess", ADMIN_KEY)
        assert refused.value.status == 401
        now[0] += 6.7  # ten in 60.3 s
    guard.check("spread", ADMIN_KEY, ADMIN_KEY)
    for _ in range(10):
        with pytest.raises(ApiError):
            guard.check("burst", "guess", ADMIN_KEY)
    with pytest.raises(ApiError) as blocked:
        guard.check("burst", ADMIN_KEY, ADMIN_KEY)
    assert (blocked.value.status, blocked.value.body["retryAfter"]) == (429, 3600)
    now[0] += 3600
    guard.check("burst", ADMIN_KEY, ADMIN_KEY)


@pytest.mark.parametrize(
    "addresses",
    [
        ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:abcd::3", "2001:db8:1:2:ffff::4"],
        ["fe80::1%1", "fe80::1%2", "fe80::1%eth0", "fe80::1"],
    ],
    ids=["one /64", "scope ids"],
)
async def test_ipv6_addresses_of_one_network_are_one_client(qp_server, addresses):
    server = qp_server(QP_RATE_LIMIT_CHATS="3/minute")
    await a_fresh_minute()
    async with aiohttp.ClientSession(server.url) as http:
        statuses = []
        for address in addresses:
            headers = {"X-Forwarded-For": address}  # from 127.0.0.1, a trusted proxy
            statuses.append((await call(http, "GET", "/api/chats/x", headers=headers))[0])
        assert statuses == [404, 404, 404, 429]
        other = {"X-Forwarded-For": "2001:db8:1:3::1"}  # the next /64: another client
        assert (await call(http, "GET", "/api/chats/x", headers=other))[0] == 404


MILLION_ADDRESSES = """
import asyncio, resource
from qp.protection.client_address import hash_client
from qp.protection.rate_limits import RateLimit, RateLimiter

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

def peak_rss():
    # VmHWM, this process's own peak: ru_maxrss also counts the parent's, whose memory
    # the child shared until exec (a pytest worker that has run other modules is large).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

async def main():
    async def save_block(client, until):
        pass

    limiter = RateLimiter({}, save_block, clock=lambda: 1_000_000.0)
    limit = RateLimit(per_minute=3, per_hour=100)
    before = rss()
    for n in range(1_000_000):
        address = f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"
        await limiter.check(hash_client(address, "salt"), "chats", limit)
    peak = peak_rss()
    print(peak - before, limiter.tracked, limiter.forgotten)

asyncio.run(main())
"""


def test_a_million_distinct_addresses_cost_the_rate_limiter_under_100_mb():
    # A fresh interpreter, so that its peak RSS is the limiter's and nothing else's.
    done = subprocess.run(
        [sys.executable, "-c", MILLION_ADDRESSES],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    growth, tracked, forgotten = map(int, done.stdout.split())
    assert growth < 100 * 2**20, f"{growth / 2**20:.0f} MB"
    assert (tracked, forgotten) == (100_000, 900_000)


async def test_expired_rate_limit_windows_are_dropped_as_clients_come_and_go():
    now = [1_000_000.0]

    async def save_block(client: str, until: float) -> None:
        pass

    limiter = RateLimiter({}, save_block, clock=lambda: now[0])
    limit = RateLimit(per_minute=3, per_hour=100)
    for n in range(1000):
        await limiter.check(f"client-{n}", "chats", limit)
    now[0] += 3600
    for n in range(300):
        await limiter.check(f"later-{n}", "chats", limit)
    assert limiter.tracked == 300
