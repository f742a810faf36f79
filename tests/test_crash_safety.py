"""SIGKILL in the middle of concurrent creates and updates loses nothing acknowledged."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiohttp

from tests.helpers import call, make_chat
from tests.helpers import run_qp as qp

WORKERS = 12


def version(chat_id: str, n: int) -> dict:
    """Version n of a chat: its model and its messages say n, so a torn chat shows."""
    return make_chat(
        chat_id,
        app="crash",
        model=f"v{n}",
        messages=[{"role": "user", "content": f"version {n}", "pad": "x" * (n % 4) * 50_000}],
        usage=(n, n, n / 1000),
    )


async def test_sigkill_mid_writes_keeps_every_acknowledged_write(qp_server):
    server = qp_server(QP_MAX_CHATS_PER_APP="100000")
    acknowledged: dict[str, int] = {}
    in_flight: dict[str, set[int]] = defaultdict(set)
    stop = asyncio.Event()

    async def worker(number: int, http: aiohttp.ClientSession) -> None:
        mine: list[str] = []
        n = 0
        while not stop.is_set():
            n += 1
            if not mine or n % 3 == 0:
                chat_id, v, method, path = f"crash-{number}-{n}", 0, "POST", "/api/chats"
            else:
                chat_id = mine[n % len(mine)]
                v = acknowledged[chat_id] + 1
                method, path = "PUT", f"/api/chats/{chat_id}"
            in_flight[chat_id].add(v)
            try:
                status, _ = await call(http, method, path, json={"chat": version(chat_id, v)})
            except (aiohttp.ClientError, AssertionError):
                return  # the server is gone
            assert status == 200
            if method == "POST":
                mine.append(chat_id)
            acknowledged[chat_id] = v
            in_flight[chat_id].discard(v)

    async with aiohttp.ClientSession(server.url) as http:
        tasks = [asyncio.create_task(worker(i, http)) for i in range(WORKERS)]
        await asyncio.sleep(2.0)
        server.kill()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert len(acknowledged) > 20, "the load did not get going"
    unanswered = {chat_id for chat_id, versions in in_flight.items() if versions}
    assert unanswered, "the kill did not land mid-write; nothing was tested"

    # Before the restart: check finds only writes that were never answered.
    found = qp(server.data_dir, "check", "--min-age", "0")
    for line in found.stdout.splitlines():
        if line != "nothing to repair":
            chat_id = line.split()[1]
            assert chat_id in unanswered, f"{line}: a write that was answered needs repair"

    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        for chat_id in sorted(set(acknowledged) | unanswered):
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            possible = in_flight[chat_id] | (
                {acknowledged[chat_id]} if chat_id in acknowledged else set()
            )
            if chat_id not in acknowledged and status == 404:
                continue  # a create that was never answered may not have happened
            assert status == 200, f"{chat_id} lost"
            n = int(chat["model"][1:])
            assert n in possible, f"{chat_id}: v{n}, but only {possible} were sent"
            expected = version(chat_id, n)
            assert chat["messages"] == expected["messages"], f"{chat_id} is torn"
            assert chat["totalUsage"] == expected["totalUsage"], f"{chat_id} is torn"
            if chat_id in acknowledged:
                assert n >= acknowledged[chat_id], f"{chat_id} went back to v{n}"
    server.stop()
    after = qp(server.data_dir, "check", "--min-age", "0")
    assert (after.returncode, after.stdout) == (0, "nothing to repair\n")
