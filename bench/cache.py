"""Benchmark the response cache: time to the first chunk of a hit beside a miss's, and the
relay with the cache off beside one with it on (a miss goes through the flight), in one
interleaved run against a fake OpenRouter process.

    .venv/bin/python bench/cache.py [--rounds 200] [--quick]

Three ways, each round in turn: "off" (a server without the cache, a new question each
time), "miss" (a server with the cache on, a new question each time: a flight and a
store), "hit" (that server, a question it has answered). Prints the median and p99 time to
first chunk and to the end of each, the ratios, and each server's CPU per completion.
It ends with the rows of the bench table (bench/all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

import aiohttp
from relay import SYSTEM, cpu_seconds, percentile  # bench/relay.py, beside this one

from tests.processes import QPServer, free_ports, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"


def question(content: str) -> dict:
    return {
        "model": MODEL,
        "systemMessage": SYSTEM,
        "messages": [{"role": "user", "content": content}],
        "app": "bench-site",
    }


async def fetch(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, float, str]:
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        assert response.status == 200, response.status
        await response.content.readany()
        first = time.perf_counter() - started
        await response.read()
        return first, time.perf_counter() - started, response.headers.get("X-QP-Cache", "")


async def run(rounds: int, urls: dict[str, str], pids: dict[str, int]) -> dict[str, float]:
    fresh = count()
    results: dict[str, list[tuple[float, float]]] = {"off": [], "miss": [], "hit": []}
    cpu: dict[str, float] = {"off": 0.0, "on": 0.0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await fetch(session, urls["on"], question("the same question"))  # stored: hits after
        for _ in range(20):  # warm-up
            await fetch(session, urls["off"], question(f"warm {next(fresh)}"))
            await fetch(session, urls["on"], question(f"warm {next(fresh)}"))
        ways = [
            ("off", "off", lambda: question(f"new {next(fresh)}"), "miss"),
            ("miss", "on", lambda: question(f"new {next(fresh)}"), "miss"),
            ("hit", "on", lambda: question("the same question"), "hit"),
        ]
        for i in range(rounds):
            for name, server, body, expected in ways[i % 3 :] + ways[: i % 3]:
                before = cpu_seconds(pids[server])
                first, whole, said = await fetch(session, urls[server], body())
                cpu[server if name == "off" else name] = cpu.get(
                    server if name == "off" else name, 0.0
                ) + (cpu_seconds(pids[server]) - before)
                assert said == expected, (name, said)
                results[name].append((first, whole))
    print(
        f"\n{'c=1, ' + str(rounds) + ' rounds':28}{'first p50':>11}{'first p99':>11}{'end p50':>10}"
    )
    for name, runs in results.items():
        firsts = [first for first, _ in runs]
        wholes = [whole for _, whole in runs]
        print(
            f"{name:28}{statistics.median(firsts) * 1000:>9.2f}ms"
            f"{percentile(firsts, 0.99) * 1000:>9.2f}ms{statistics.median(wholes) * 1000:>8.2f}ms"
        )
    median = {name: statistics.median(first for first, _ in runs) for name, runs in results.items()}
    cpu_per = {name: cpu.get(name, 0.0) / rounds * 1e6 for name in ("off", "miss", "hit")}
    shown = ", ".join(f"{name} {value:.0f}" for name, value in cpu_per.items())
    print(f"\nserver CPU per completion, µs (clock ticks of 10 ms: rough): {shown}")
    return {
        "hit": median["hit"],
        "miss": median["miss"],
        "off": median["off"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="100 rounds (make bench)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 100
    tmp = Path(tempfile.mkdtemp(prefix="qp-bench-cache-"))
    (fake_port,) = free_ports()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openrouter", "--port", str(fake_port)], cwd=ROOT
    )
    servers: list[QPServer] = []
    try:
        wait_for_port(fake_port, 20, fake)
        upstream = f"http://127.0.0.1:{fake_port}/api/v1/chat/completions"
        config = tmp / "cache.toml"
        config.write_text("[cache]\nttl_seconds = 3600\n")
        env = {
            "QP_OPENROUTER_URL": upstream,
            "OPENROUTER_API_KEY": "bench",
            "QP_CHEAP_MODELS": MODEL,
            "QP_RATE_LIMIT_COMPLETION": "off",
        }
        off = QPServer(tmp / "off", env).start()
        servers.append(off)
        on = QPServer(tmp / "on", {**env, "QP_CONFIG": str(config)}).start()
        servers.append(on)
        medians = asyncio.run(
            run(
                args.rounds,
                {"off": f"{off.url}/api/completion", "on": f"{on.url}/api/completion"},
                {"off": off.process.pid, "on": on.process.pid},
            )
        )
    finally:
        for server in servers:
            server.stop()
        fake.terminate()
        fake.wait()
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| cache hit, time to first chunk, c=1 | miss {medians['miss'] * 1000:.2f} ms"
        f" | {medians['hit'] * 1000:.2f} ms | {medians['hit'] / medians['miss']:.2f}x | below 1x |"
    )
    print(
        f"| cache on, a miss's first chunk, c=1 | cache off {medians['off'] * 1000:.2f} ms"
        f" | {medians['miss'] * 1000:.2f} ms | {medians['miss'] / medians['off']:.2f}x | about 1x |"
    )


if __name__ == "__main__":
    main()
