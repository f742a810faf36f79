"""Soak: a mixed load, friendly and hostile, for a while; the server's resources each minute.

    .venv/bin/python bench/soak.py [--minutes 10]

The server runs with its defaults (rate limits, quotas, timeouts on) against a fake
OpenRouter of its own. The load, from many client addresses (X-Forwarded-For from
loopback, a trusted proxy):
- chat clients: create a chat, update it, read it back, over and over;
- completion clients: streams of 100 tokens, a third of them abandoned after the first;
- an admin listing an app every two seconds;
- hostile clients cycling through what issue 9 lists: requests the parser rejects, headers
  sent too slowly, bodies that stop, wrong admin keys, app names of 390 KiB, messages nested
  300 deep, bodies over 10 MiB, usage far beyond 64 bits, odd `since` values.
Each minute it prints the server's RSS, open descriptors, event-loop lag (p50 and p99 from
its qp_event_loop_lag_seconds histogram, that minute) and counts of answers by kind; at the
end, whether RSS and descriptors stayed within 10 % after the first minute, and whether any
answer was a server error (5xx other than the 503s and 502s a fake stream can cause: none
are expected here).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import orjson

from qp.policy.policy import DEFAULT_REQUIRED_PHRASE_GROUPS
from tests.helpers import make_chat
from tests.processes import QPServer, free_ports, rss_of, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "soak-admin-key"
SYSTEM = " ".join(group[0] for group in DEFAULT_REQUIRED_PHRASE_GROUPS)
MESSAGES = [{"role": "user", "content": "lorem ipsum " * 300}] * 12  # about 45 KB


class Tally:
    def __init__(self) -> None:
        self.minute: collections.Counter[str] = collections.Counter()
        self.total: collections.Counter[str] = collections.Counter()

    def note(self, kind: str) -> None:
        self.minute[kind] += 1
        self.total[kind] += 1


def client_address() -> str:
    """One of 5,000 friendly clients."""
    n = random.randrange(5000)
    return f"10.0.{n // 250}.{n % 250 + 1}"


def spoofed() -> dict[str, str]:
    """One of 5,000 hostile clients (rate limits and blocks do not touch the friendly ones)."""
    n = random.randrange(5000)
    return {"X-Forwarded-For": f"172.16.{n // 250}.{n % 250 + 1}"}


def status_kind(status: int) -> str:
    return "5xx" if status >= 500 else f"{status // 100}xx"


async def chat_client(http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
    """Keeps 50 chats of its own: creates one, updates and reads others; past 50, deletes
    the oldest (admin), so the stored data reaches a steady size."""
    mine: collections.deque[str] = collections.deque()
    while not stop.is_set():
        headers = {"X-Forwarded-For": client_address()}
        chat = make_chat(app="soak", messages=MESSAGES)
        async with http.post("/api/chats", json={"chat": chat}, headers=headers) as response:
            tally.note(status_kind(response.status))
            if response.status == 200:
                mine.append((await response.json())["chatId"])
        for chat_id in random.sample(list(mine), min(3, len(mine))):
            chat["chatId"] = chat_id
            path = f"/api/chats/{chat_id}"
            async with http.put(path, json={"chat": chat}, headers=headers) as response:
                tally.note(status_kind(response.status))
            async with http.get(path, headers=headers) as response:
                await response.read()
                tally.note(status_kind(response.status))
        if len(mine) > 50:
            path = f"/api/chats/{mine.popleft()}"
            async with http.delete(path, headers={"x-admin-key": ADMIN_KEY}) as response:
                tally.note(status_kind(response.status))


async def completion_client(http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        body = {
            "model": "soak/model",
            "systemMessage": SYSTEM,
            "messages": [{"role": "user", "content": "script:paced"}],
            "app": "soak",
        }
        headers = {"X-Forwarded-For": client_address()}
        async with http.post("/api/completion", json=body, headers=headers) as response:
            tally.note(status_kind(response.status))
            if n % 3 == 0:
                await response.content.readany()
                response.close()  # abandoned
                tally.note("abandoned")
                continue
            await response.read()


async def admin_client(http: aiohttp.ClientSession, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        headers = {"x-admin-key": ADMIN_KEY}
        async with http.get("/api/chats?app=soak", headers=headers) as response:
            await response.read()
            tally.note(status_kind(response.status))
        await asyncio.sleep(2)


def deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


async def raw(port: int, data: bytes, pause: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await asyncio.sleep(pause)
        async with asyncio.timeout(15):
            await reader.read()
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


async def hostile_client(
    http: aiohttp.ClientSession, port: int, tally: Tally, stop: asyncio.Event
) -> None:
    """Cycles through the hostile moves; the slow ones (held connections) run on their
    own, at most 50 at a time."""
    raw_moves = [
        lambda: raw(port, b"GET /api/chats/x HTTP/1.1\r\nx-admin-key: a\x01b\r\n\r\n"),
        lambda: raw(port, b"GET /api/chats/x HTTP/1.1\r\nHost: x\r\n", pause=12),
        lambda: raw(port, b"POST /api/chats HTTP/1.1\r\nContent-Length: 999\r\n\r\n{", 2),
    ]
    http_moves = [
        lambda: http.get("/api/usage", headers={"x-admin-key": "guess", **spoofed()}),
        lambda: http.post(
            "/api/chats", json={"chat": make_chat(app="x" * 400_000)}, headers=spoofed()
        ),
        lambda: http.post(
            "/api/chats", json={"chat": make_chat(messages=deep(300))}, headers=spoofed()
        ),
        lambda: http.post(
            "/api/chats",
            data=orjson.dumps({"chat": make_chat(messages=["x" * (11 * 2**20)])}),
            headers=spoofed(),
        ),
        lambda: http.post(
            "/api/chats",
            json={"chat": make_chat(usage=(2**64 - 1, 0, 0))},
            headers=spoofed(),
        ),
        lambda: http.get(
            "/api/usage",
            params={"since": "0001-01-01T00:00:00+14:00"},
            headers={"x-admin-key": ADMIN_KEY},
        ),
    ]
    held: set[asyncio.Task] = set()
    n = 0
    while not stop.is_set():
        n += 1
        if len(held) < 50:
            task = asyncio.create_task(raw_moves[n % len(raw_moves)]())
            held.add(task)
            task.add_done_callback(held.discard)
            tally.note("hostile raw")
        try:
            async with http_moves[n % len(http_moves)]() as response:
                await response.read()
                tally.note(f"hostile {status_kind(response.status)}")
        except aiohttp.ClientError:
            tally.note("hostile cut")
        await asyncio.sleep(0.02)
    for task in held:
        task.cancel()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lag_histogram(text: str) -> dict[float, float]:
    buckets = {}
    for line in text.splitlines():
        if line.startswith("qp_event_loop_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return buckets


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile q of this minute's samples."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = counts[float("inf")]
    if not total:
        return 0.0
    for bound in sorted(counts):
        if counts[bound] >= q * total:
            return bound
    return float("inf")


async def run(args: argparse.Namespace, server: QPServer) -> int:
    tally = Tally()
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    pid = server.process.pid
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as http:
        workers = [chat_client(http, tally, stop) for _ in range(4)]
        workers += [completion_client(http, tally, stop) for _ in range(4)]
        workers += [admin_client(http, tally, stop)]
        workers += [hostile_client(http, server.port, tally, stop) for _ in range(4)]
        tasks = [asyncio.create_task(worker) for worker in workers]
        samples = []
        async with http.get("/metrics") as response:
            lag_before = lag_histogram(await response.text())
        print(f"{'min':>3} {'RSS MB':>7} {'fds':>5} {'lag p50':>8} {'lag p99':>8}  answers")
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(60)
            async with http.get("/metrics") as response:
                lag_now = lag_histogram(await response.text())
            rss, fds = rss_of(pid) / 2**20, open_descriptors(pid)
            p50, p99 = quantile(lag_before, lag_now, 0.5), quantile(lag_before, lag_now, 0.99)
            lag_before = lag_now
            samples.append((rss, fds, p99))
            counts = ", ".join(f"{k} {v}" for k, v in sorted(tally.minute.items()))
            print(
                f"{minute:>3} {rss:7.1f} {fds:5d} {p50 * 1000:6.1f}ms {p99 * 1000:6.1f}ms  {counts}"
            )
            tally.minute.clear()
        stop.set()
        await asyncio.wait(tasks, timeout=90)
    steady = samples[1:] or samples
    rss_values, fd_values = [s[0] for s in steady], [s[1] for s in steady]
    rss_spread = (max(rss_values) - min(rss_values)) / min(rss_values) * 100
    fd_spread = (max(fd_values) - min(fd_values)) / max(1, min(fd_values)) * 100
    worst_p99 = max(s[2] for s in samples) * 1000
    errors = tally.total["5xx"] + tally.total["hostile 5xx"]
    print(
        f"\nafter the first minute: RSS {min(rss_values):.0f}-{max(rss_values):.0f} MB"
        f" ({rss_spread:.1f} %), descriptors {min(fd_values)}-{max(fd_values)}"
        f" ({fd_spread:.1f} %); worst minute's loop lag p99 {worst_p99:.0f} ms;"
        f" server errors {errors}"
    )
    print(f"all answers: {dict(sorted(tally.total.items()))}")
    return 0 if errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10)
    args = parser.parse_args()
    (fake_port,) = free_ports()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openrouter", "--port", str(fake_port)], cwd=ROOT
    )
    server = QPServer(
        Path(tempfile.mkdtemp(prefix="qp-soak-")),
        {
            "ADMIN_KEY": ADMIN_KEY,
            "QP_OPENROUTER_URL": f"http://127.0.0.1:{fake_port}/api/v1/chat/completions",
            "OPENROUTER_API_KEY": "soak-key",
            "QP_CHEAP_MODELS": "soak/model",
            # The server's defaults, which the test suite turns off.
            "QP_RATE_LIMIT_CHATS": "300/minute,5000/hour",
            "QP_RATE_LIMIT_COMPLETION": "100/minute,1000/hour",
            "QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY": str(200 * 2**20),
            "QP_MIN_FREE_MB": "256",
        },
    )
    try:
        wait_for_port(fake_port, 20, fake)
        server.start()
        return asyncio.run(run(args, server))
    finally:
        server.stop()
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    sys.exit(main())
