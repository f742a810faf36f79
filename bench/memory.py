"""What large chats cost the server in memory: peak RSS while anonymous clients read them
at once, and while admins list them, against the server's idle RSS.

    .venv/bin/python bench/memory.py [--chats 100] [--mb 10] [--gets 40] [--lists 3]

Stores `--chats` chats of `--mb` MiB each in one app (many small messages, the shape that
costs most once parsed), then, with the server's RSS sampled every 10 ms: `--gets`
concurrent GETs of different chats, twice; `--lists` concurrent admin lists of the app.
Prints idle RSS, the peak over idle of each phase, and the RSS left afterwards. The issue's
target: each peak at most 500 MB over idle, and within 100 MB of idle afterwards. `--quick`
(for `make bench`) stores 30 chats and reads 30 at once; it ends with the rows of the bench
table (bench/all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.helpers import big_chat
from tests.processes import QPServer, RssSampler

ADMIN_KEY = "bench-admin-key"


async def run(args: argparse.Namespace, data: Path) -> None:
    server = QPServer(
        data,
        {"ADMIN_KEY": ADMIN_KEY, "QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY": "0", "QP_CACHE_MB": "64"},
    ).start()
    timeout = aiohttp.ClientTimeout(total=600)
    try:
        async with aiohttp.ClientSession(server.url, timeout=timeout) as http:
            started = time.perf_counter()
            ids = []
            for n in range(args.chats):
                body = big_chat(f"memory-{n}", "memory-bench", args.mb)
                async with http.post("/api/chats", data=body) as response:
                    assert response.status == 200, await response.text()
                ids.append(f"memory-{n}")
            took = time.perf_counter() - started
            print(f"stored {args.chats} chats of {args.mb} MiB in {took:.1f} s")
            await asyncio.sleep(2)
            sampler = RssSampler(server.process.pid)
            idle = sampler.now()
            print(f"idle RSS: {idle / 2**20:.0f} MB")

            async def get(chat_id: str) -> int:
                async with http.get(f"/api/chats/{chat_id}") as response:
                    return len(await response.read())

            async def listing() -> int:
                async with http.get(
                    "/api/chats?app=memory-bench", headers={"x-admin-key": ADMIN_KEY}
                ) as response:
                    total = 0
                    async for chunk in response.content.iter_chunked(1 << 20):
                        total += len(chunk)
                    return total

            rows = []
            for label, calls in (
                (
                    f"{args.gets} concurrent GETs",
                    [get(ids[i % len(ids)]) for i in range(args.gets)],
                ),
                (
                    f"{args.gets} concurrent GETs again",
                    [get(ids[(i + 7) % len(ids)]) for i in range(args.gets)],
                ),
                (f"{args.lists} concurrent admin lists", [listing() for _ in range(args.lists)]),
            ):
                with sampler.sampling():
                    started = time.perf_counter()
                    sizes = await asyncio.gather(*calls)
                    took = time.perf_counter() - started
                await asyncio.sleep(1.0)
                peak, after = (sampler.peak - idle) / 2**20, (sampler.now() - idle) / 2**20
                print(
                    f"{label}: {sum(sizes) / 2**20:.0f} MB in {took:.1f} s;"
                    f" peak {peak:+.0f} MB over idle, after {after:+.0f} MB"
                )
                rows.append((label, peak, after))
    finally:
        server.stop()
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for label, peak, after in rows:
        what = f"RSS, {label} of {args.mb} MiB chats"
        baseline = f"idle {idle / 2**20:.0f} MB"
        print(f"| {what}: peak | {baseline} | {peak:+.0f} MB | — | ≤ +500 MB |")
        print(f"| {what}: after | {baseline} | {after:+.0f} MB | — | ≤ +100 MB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--gets", type=int, default=40)
    parser.add_argument("--lists", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a new folder (default: a fresh temporary one)")
    parser.add_argument("--quick", action="store_true", help="30 chats, 30 GETs at once")
    args = parser.parse_args()
    if args.quick:
        args.chats, args.gets = 30, 30
    data = args.data or Path(tempfile.mkdtemp(prefix="qp-bench-memory-"))
    try:
        asyncio.run(run(args, data))
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
