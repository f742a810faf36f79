"""Memory is bounded by configuration, not by what clients send: large chats read, listed
and written at once raise the server's RSS (sampled every 10 ms) by a bounded amount."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from tests.helpers import ADMIN_KEY, big_chat
from tests.processes import QPServer, RssSampler

MB = 2**20
CHATS = 100
CHAT_MIB = 10
# The bounds: at most 500 MB over idle while it happens, within 100 MB after.
PEAK_OVER_IDLE = 500 * MB
LEFT_OVER_IDLE = 100 * MB


def big_chats() -> Callable[[int], bytes]:
    """n -> the create body of chat big-n, 10 MiB in app big-app (made once: making one
    costs the test's process a sixth of a second)."""
    template = big_chat("big-n", "big-app", CHAT_MIB)
    return lambda n: template.replace(b'"big-n"', f'"big-{n}"'.encode(), 1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Iterator[QPServer]:
    """One server holding a hundred 10 MiB chats in one app."""
    server = QPServer(tmp_path_factory.mktemp("memory"), {"ADMIN_KEY": ADMIN_KEY}).start()
    body_of = big_chats()

    async def store() -> None:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(server.url, timeout=timeout) as http:

            async def create(n: int) -> None:
                async with http.post("/api/chats", data=body_of(n)) as response:
                    assert response.status == 200, await response.text()

            # Two at a time (one parsed while the other is received), and the last one
            # alone, so that it is the newest.
            for n in range(0, CHATS - 1, 2):
                await asyncio.gather(*(create(m) for m in (n, n + 1) if m < CHATS - 1))
            await create(CHATS - 1)

    asyncio.run(store())
    yield server
    server.stop()


async def measure(server: QPServer, calls) -> tuple[int, int, list]:
    """Peak RSS over idle while the calls run together, RSS over idle after, their results."""
    sampler = RssSampler(server.process.pid)
    await asyncio.sleep(0.5)
    idle = sampler.now()
    with sampler.sampling():
        results = await asyncio.gather(*calls)
    await asyncio.sleep(1.0)
    return sampler.peak - idle, sampler.now() - idle, results


async def test_forty_anonymous_reads_of_large_chats_stay_within_the_budget(loaded):
    async with aiohttp.ClientSession(loaded.url) as http:

        async def get(n: int) -> int:
            async with http.get(f"/api/chats/big-{n}") as response:
                assert response.status == 200
                body = await response.read()
                assert body.startswith(b'{"chatId":"big-') and body.endswith(b'Z"}')
                return len(body)

        peak, left, sizes = await measure(loaded, [get(n) for n in range(40)])
    assert all(size > 9 * MB for size in sizes)
    assert peak <= PEAK_OVER_IDLE, f"peak {peak / MB:.0f} MB over idle"
    assert left <= LEFT_OVER_IDLE, f"{left / MB:.0f} MB over idle afterwards"


async def test_three_admin_lists_of_a_gigabyte_each_stay_within_the_budget(loaded):
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(loaded.url, timeout=timeout) as http:

        async def listing() -> tuple[int, bytes, bytes]:
            headers = {"x-admin-key": ADMIN_KEY}
            async with http.get("/api/chats?app=big-app", headers=headers) as response:
                assert response.status == 200
                size, first, last = 0, b"", b""
                async for piece in response.content.iter_chunked(MB):
                    first = (first + piece)[:100] if len(first) < 100 else first
                    last = (last + piece)[-100:]
                    size += len(piece)
                return size, first, last

        peak, left, lists = await measure(loaded, [listing() for _ in range(3)])
    for size, first, last in lists:
        assert size > CHATS * 9 * MB
        assert first.startswith(b'[{"chatId":"big-99","app":"big-app"') and last.endswith(b'"}]')
    assert peak <= PEAK_OVER_IDLE, f"peak {peak / MB:.0f} MB over idle"
    assert left <= LEFT_OVER_IDLE, f"{left / MB:.0f} MB over idle afterwards"


async def test_forty_large_uploads_at_once_wait_their_turn_within_the_budget(loaded):
    body_of = big_chats()
    bodies = [body_of(n) for n in range(40)]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(loaded.url, timeout=timeout) as http:

        async def put(n: int) -> int:
            async with http.put(f"/api/chats/big-{n}", data=bodies[n]) as response:
                return response.status

        peak, left, statuses = await measure(loaded, [put(n) for n in range(40)])
    assert statuses == [200] * 40
    assert peak <= PEAK_OVER_IDLE, f"peak {peak / MB:.0f} MB over idle"
    assert left <= LEFT_OVER_IDLE, f"{left / MB:.0f} MB over idle afterwards"
