"""Benchmark the completion relay: the same streamed completion fetched straight from a fake
OpenRouter, through qp-server, through a second qp-server with every budget on (large
caps, so none refuses) and a completion rate limit, through a third like the first (the
control: how far two identical servers differ on this machine), and, where PostgreSQL is
installed, through a fourth with its ledger there and a fifth with the second's budgets
and rate counts shared there, interleaved in one run.

    .venv/bin/python bench/relay.py [--rounds 200] [--quick]

`--quick` (for `make bench`) measures what issue 22 targets instead, in one interleaved run:
qp-server beside "the floor" (FLOOR_APP: the least an aiohttp server can do to pass a
stream on: parse the body, add the system message, post upstream, copy the chunks back),
each on asyncio's loop and on uvloop; then qp-server's RSS idle and with 1,000 open streams.
It ends with the rows of the bench table (bench/all.py).

The fake upstream runs as its own process (tests/fake_openrouter.py). Prints, at
concurrency 1 and 100: median and p99 time to first chunk both ways and the difference,
and stream throughput both ways; the added time to first chunk with budgets on beside the
control's, and each server's CPU time per completion; then the server's resident memory
idle and while it holds 1,000 open streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

from qp.policy.policy import DEFAULT_REQUIRED_PHRASE_GROUPS
from tests.processes import PostgresServer, QPServer, free_ports, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"
SYSTEM = " ".join(group[0] for group in DEFAULT_REQUIRED_PHRASE_GROUPS)


FLOOR_APP = textwrap.dedent(
    """
    import asyncio, sys
    import aiohttp, orjson
    from aiohttp import web

    port, loop_name, upstream = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    async def relay(request):
        body = orjson.loads(await request.read())
        messages = [{"role": "system", "content": body["systemMessage"]}, *body["messages"]]
        payload = orjson.dumps({"model": body["model"], "messages": messages, "stream": True})
        headers = {"Content-Type": "application/json", "Authorization": "Bearer floor"}
        async with request.app["session"].post(upstream, data=payload, headers=headers) as up:
            response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session(app):
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.router.add_post("/api/completion", relay)
    app.cleanup_ctx.append(session)
    if loop_name == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)
    """
)


def completion(script: str) -> dict:
    return {
        "model": MODEL,
        "systemMessage": SYSTEM,
        "messages": [{"role": "user", "content": f"script:{script}"}],
    }


def upstream_body(script: str) -> dict:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"script:{script}"},
        ],
        "stream": True,
        "tools": [],
        "usage": {"include": True},
    }


async def fetch(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, float, int]:
    """Seconds to the first chunk, seconds to the end, bytes."""
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        assert response.status == 200, response.status
        first = await response.content.readany()
        first_at = time.perf_counter()
        size = len(first)
        while chunk := await response.content.readany():
            size += len(chunk)
    return first_at - started, time.perf_counter() - started, size


async def interleaved(
    session: aiohttp.ClientSession,
    direct_url: str,
    relay_url: str,
    script: str,
    rounds: int,
    concurrency: int,
    more: dict[str, str] | None = None,
) -> dict[str, list[tuple[float, float, int]]]:
    """`rounds` rounds; each runs `concurrency` fetches one way, then the other(s), rotating
    which goes first, so all see the same machine. `more`: other servers, by name."""
    results: dict[str, list] = {"direct": [], "relay": []}
    ways = [("direct", direct_url, upstream_body(script)), ("relay", relay_url, completion(script))]
    for name, url in (more or {}).items():
        results[name] = []
        ways.append((name, url, completion(script)))
    for i in range(rounds):
        for name, url, body in ways[i % len(ways) :] + ways[: i % len(ways)]:
            results[name] += await asyncio.gather(
                *(fetch(session, url, body) for _ in range(concurrency))
            )
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def hold_streams(session: aiohttp.ClientSession, relay_url: str, count: int, pid: int):
    responses = []

    async def open_one():
        response = await session.post(relay_url, json=completion("hold"))
        assert response.status == 200
        await response.content.readany()
        responses.append(response)

    await asyncio.gather(*(open_one() for _ in range(count)))
    await asyncio.sleep(1.0)
    held = rss_mb(pid)
    for response in responses:
        response.close()
    return held


def aggregate_mb_per_s(runs: list[tuple[float, float, int]], concurrency: int) -> float:
    """Median over rounds of the round's bytes over its slowest stream's time."""
    rounds = [runs[i : i + concurrency] for i in range(0, len(runs), concurrency)]
    return statistics.median(
        sum(r[2] for r in batch) / max(r[1] for r in batch) / 1e6 for batch in rounds
    )


async def run(
    args: argparse.Namespace,
    direct_url: str,
    relay_url: str,
    more: dict[str, str],
    pids: dict[str, int],
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    pid = pids["relay"]
    async with aiohttp.ClientSession(connector=connector) as session:
        await interleaved(session, direct_url, relay_url, "first", 10, 4, more)  # warm-up
        print(f"\n{'':34}{'direct':>10}{'relay':>11}{'relay - direct':>16}")
        for concurrency, rounds in ((1, args.rounds), (100, max(3, args.rounds // 10))):
            cpu_before = {name: cpu_seconds(p) for name, p in pids.items()}
            first = await interleaved(
                session, direct_url, relay_url, "first", rounds, concurrency, more
            )
            cpu = {
                name: (cpu_seconds(p) - cpu_before[name]) / (rounds * concurrency) * 1e6
                for name, p in pids.items()
            }
            for label, fraction in (("median", 0.5), ("p99", 0.99)):
                ms = {
                    way: percentile([run[0] for run in first[way]], fraction) * 1000
                    for way in ("direct", "relay", *more)
                }
                d, r = ms["direct"], ms["relay"]
                others = ", ".join(f"{way} {ms[way] - r:+.2f}ms" for way in more)
                print(
                    f"c={concurrency:<3} time to first chunk, {label:6}  {d:8.2f}ms {r:8.2f}ms"
                    f" {r - d:+12.2f}ms   vs relay: {others}"
                )
            used = ", ".join(f"{name} {cpu[name]:.0f} us" for name in pids)
            print(f"c={concurrency:<3} CPU per completion: {used}")
            few = max(3, rounds // 20)
            paced = await interleaved(session, direct_url, relay_url, "paced", few, concurrency)
            d, r = (statistics.median(run[1] for run in paced[way]) for way in ("direct", "relay"))
            print(
                f"c={concurrency:<3} 100 tokens 10 ms apart, whole  {d * 1000:8.1f}ms"
                f" {r * 1000:8.1f}ms {d / r * 100:11.1f}% of direct speed"
            )
            bulk = await interleaved(session, direct_url, relay_url, "bulk", few, concurrency)
            d, r = (aggregate_mb_per_s(bulk[way], concurrency) for way in ("direct", "relay"))
            print(
                f"c={concurrency:<3} 8 MB as fast as it goes, MB/s  {d:8.1f}   {r:8.1f}  "
                f" {r / d * 100:11.1f}% of direct speed"
            )
        idle = rss_mb(pid)
        held = await hold_streams(session, relay_url, 1000, pid)
        print(
            f"\nserver RSS idle {idle:.1f} MB; holding 1000 open streams {held:.1f} MB"
            f" (+{held - idle:.1f} MB; target <= +100 MB)"
        )


async def quick(direct_url: str, servers: dict[str, int], qp_uvloop: int) -> None:
    """Issue 22's relay rows: qp-server against the floor, on each loop, interleaved.
    `servers`: name ("floor asyncio", "qp asyncio", ...) -> pid; qp_uvloop: the pid whose
    memory is measured."""
    urls = {name: f"http://127.0.0.1:{port}/api/completion" for name, port in PORTS.items()}
    more = {name: urls[name] for name in servers if name != "qp asyncio"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        relay_url = urls["qp asyncio"]
        idle = rss_mb(qp_uvloop)  # started, nothing asked of it yet
        await interleaved(session, direct_url, relay_url, "first", 10, 4, more)  # warm-up
        first = await interleaved(session, direct_url, relay_url, "first", 150, 1, more)
        first["qp asyncio"] = first.pop("relay")
        latency = {
            way: statistics.median(run[0] for run in runs) * 1000 for way, runs in first.items()
        }
        rounds = 10
        cpu_before = {name: cpu_seconds(pid) for name, pid in servers.items()}
        await interleaved(session, direct_url, relay_url, "first", rounds, 100, more)
        cpu = {
            name: (cpu_seconds(pid) - cpu_before[name]) / (rounds * 100) * 1e6
            for name, pid in servers.items()
        }
        warm = rss_mb(qp_uvloop)
        held = await hold_streams(session, urls["qp uvloop"], 1000, qp_uvloop)
    direct = latency["direct"]
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for loop in ("asyncio", "uvloop"):
        floor, ours = latency[f"floor {loop}"] - direct, latency[f"qp {loop}"] - direct
        print(
            f"| added first-chunk latency, c=1, {loop} | floor {floor:+.2f} ms"
            f" | {ours:+.2f} ms | {ours - floor:+.2f} ms | within +0.10 ms of the floor |"
        )
    for loop in ("asyncio", "uvloop"):
        floor, ours = cpu[f"floor {loop}"], cpu[f"qp {loop}"]
        target = "≤ 1.25x" + (", ≤ 500 µs" if loop == "uvloop" else "")
        print(
            f"| server CPU per streamed completion, c=100, {loop} | floor {floor:.0f} µs"
            f" | {ours:.0f} µs | {ours / floor:.2f}x | {target} |"
        )
    print(f"| idle RSS, started (uvloop) | — | {idle:.0f} MB | — | ≤ 60 MB |")
    print(
        f"| RSS with 1,000 open streams (uvloop) | after the runs {warm:.0f} MB"
        f" | {held - warm:+.0f} MB | — | ≤ +100 MB |"
    )


PORTS: dict[str, int] = {}


def run_quick(fake_port: int) -> int:
    direct_url = f"http://127.0.0.1:{fake_port}/api/v1/chat/completions"
    env = {
        "QP_OPENROUTER_URL": direct_url,
        "OPENROUTER_API_KEY": "bench-key",
        "QP_CHEAP_MODELS": MODEL,
    }
    floors, qps = [], {}
    try:
        pids = {}
        for loop in ("asyncio", "uvloop"):
            (port,) = free_ports()
            floor = subprocess.Popen(
                [sys.executable, "-c", FLOOR_APP, str(port), loop, direct_url], cwd=ROOT
            )
            floors.append(floor)
            wait_for_port(port, 30, floor)
            PORTS[f"floor {loop}"], pids[f"floor {loop}"] = port, floor.pid
            data = Path(tempfile.mkdtemp(prefix=f"qp-relay-bench-{loop}-"))
            server = QPServer(data, {**env, "QP_EVENT_LOOP": loop}).start()
            qps[loop] = server
            PORTS[f"qp {loop}"], pids[f"qp {loop}"] = server.port, server.process.pid
        asyncio.run(quick(direct_url, pids, pids["qp uvloop"]))
    finally:
        for floor in floors:
            floor.terminate()
            floor.wait()
        for server in qps.values():
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="issue 22's rows, floor vs qp")
    args = parser.parse_args()
    (fake_port,) = free_ports()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openrouter", "--port", str(fake_port)], cwd=ROOT
    )
    if args.quick:
        try:
            wait_for_port(fake_port, 30, fake)
            return run_quick(fake_port)
        finally:
            fake.terminate()
            fake.wait()
    direct_url = f"http://127.0.0.1:{fake_port}/api/v1/chat/completions"
    env = {
        "QP_OPENROUTER_URL": direct_url,
        "OPENROUTER_API_KEY": "bench-key",
        "QP_CHEAP_MODELS": MODEL,
    }
    server = QPServer(Path(tempfile.mkdtemp(prefix="qp-relay-bench-")), env)
    # Every budget on (large caps, so none refuses) and a completion rate limit that never
    # refuses: what a request costs to count and reserve.
    guarded = {
        **env,
        "QP_BUDGET_SERVER_DAILY_USD": "1000000",
        "QP_BUDGET_SERVER_MONTHLY_USD": "1000000",
        "QP_BUDGET_APP_DAILY_USD": "*=1000000",
        "QP_BUDGET_CLIENT_DAILY_USD": "1000000",
        "QP_BUDGET_CLIENT_MAX_STREAMS": "100000",
        "QP_RATE_LIMIT_COMPLETION": "1000000/minute",
    }
    budgeted = QPServer(Path(tempfile.mkdtemp(prefix="qp-relay-bench-budgets-")), guarded)
    control = QPServer(Path(tempfile.mkdtemp(prefix="qp-relay-bench-control-")), env)
    servers = {"relay": server, "budgets": budgeted, "control": control}
    # The ledger on PostgreSQL (durable defaults) instead of SQLite, where it is installed.
    postgres = None
    if PostgresServer.bindir() is not None:
        postgres = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-relay-bench-pg-")), True)
        postgres.start()
        servers["postgres"] = QPServer(
            Path(tempfile.mkdtemp(prefix="qp-relay-bench-postgres-")),
            {**env, "QP_DATABASE": postgres.create_database()},
        )
        # Budgets and rate counts shared in PostgreSQL: compare with `budgets`.
        servers["pg-budgets"] = QPServer(
            Path(tempfile.mkdtemp(prefix="qp-relay-bench-pg-budgets-")),
            {**guarded, "QP_DATABASE": postgres.create_database()},
        )
    try:
        wait_for_port(fake_port, 20, fake)
        for started in servers.values():
            started.start()
        asyncio.run(
            run(
                args,
                direct_url,
                f"{server.url}/api/completion",
                {
                    name: f"{started.url}/api/completion"
                    for name, started in servers.items()
                    if name != "relay"
                },
                {name: started.process.pid for name, started in servers.items()},
            )
        )
    finally:
        for started in servers.values():
            started.stop()
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.data_dir, ignore_errors=True)
        fake.terminate()
        fake.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
