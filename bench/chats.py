"""Benchmark the /api/chats routes on both blob backends and both databases against a bare
aiohttp app, in one run.

    .venv/bin/python bench/chats.py [--seconds 8] [--connections 32] [--loop uvloop|asyncio]
    .venv/bin/python bench/chats.py --quick    # GET and the lists only, no PostgreSQL

The bare app runs on the loop the server is told to use (QP_EVENT_LOOP, `--loop`): the
ratio compares handlers, not event loops.

Needs wrk (Debian: `apt-get install wrk`) as the load generator: it is C, runs one thread
here, and leaves the other core to the server. SeaweedFS comes from the dev requirements.
Prints requests/s and p50/p99 latency per route and backend, then the ratios the chat-store
issue targets: GET on the file store vs the bare app's requests/s, and the admin list of
100 chats from S3 vs one GET (latency at one connection); then PostgreSQL (durable
defaults, on this machine, file blobs) beside SQLite (synchronous=FULL), route by route,
alone and beside a second (idle) server process on the same database.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import make_chat
from tests.processes import PostgresServer, QPServer, SeaweedFS, free_ports, wait_for_port

ADMIN_KEY = "bench-admin-key"
BARE_APP = textwrap.dedent(
    """
    import asyncio
    import sys
    from aiohttp import web

    async def hello(request):
        return web.json_response({"ok": True, "name": "bare"})

    app = web.Application()
    app.router.add_get("/", hello)
    if sys.argv[2] == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=loop
    )
    """
)
# A chat of typical size: a few turns, about 4 KB of messages.
MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "lorem ipsum " * 40}
    for i in range(8)
]


@dataclass
class Result:
    label: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(url: str, seconds: int, connections: int, script: str | None, label: str) -> Result:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        if script:
            lua.write(script)
    if script:
        args += ["-s", lua.name]
    output = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    Path(lua.name).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        print(f"  ({label}: socket errors: {socket_errors.group(1)})")
    return Result(
        label,
        rps,
        _percentile(output, "50"),
        _percentile(output, "99"),
        int(errors.group(1)) if errors else 0,
    )


def _percentile(output: str, which: str) -> float:
    value, unit = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def request(url: str, method: str = "GET", body: dict | None = None, headers=None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


def lua_body(method: str, body: str, randomise_app: bool = False) -> str:
    script = f'wrk.method = "{method}"\nwrk.headers["Content-Type"] = "application/json"\n'
    if not randomise_app:
        return script + f"wrk.body = [[{body}]]\n"
    # A new chat per request, spread over 1,000 apps so no app reaches its chat limit.
    head, tail = body.split("__APP__")
    return script + (
        f"local head, tail = [[{head}]], [[{tail}]]\n"
        "request = function()\n"
        '  return wrk.format(nil, nil, nil, head .. "bench-" .. math.random(1, 1000) .. tail)\n'
        "end\n"
    )


CHAT_ID = "benchChat0000000000001"
TIMES = "\N{MULTIPLICATION SIGN}"
QUICK_ROUTES = ("GET", "GET c=1", "list 100 c=1")


def bench_server(
    name: str, server: QPServer, seconds: int, connections: int, quick: bool = False
) -> dict[str, Result]:
    base = server.url
    if not server.data_dir.joinpath("seeded").exists():
        server.data_dir.joinpath("seeded").touch()
        chat = make_chat(CHAT_ID, "bench", messages=MESSAGES)
        request(f"{base}/api/chats", "POST", {"chat": chat})
        for _ in range(100):
            chat = make_chat(app="bench-list", messages=MESSAGES)
            request(f"{base}/api/chats", "POST", {"chat": chat})
    chat_id = CHAT_ID
    put_body = json.dumps({"chat": make_chat(chat_id, "bench", messages=MESSAGES)})
    post_body = json.dumps({"chat": make_chat(app="__APP__", messages=MESSAGES)})
    admin = f'wrk.headers["x-admin-key"] = "{ADMIN_KEY}"\n'
    get_url, list_url = f"{base}/api/chats/{chat_id}", f"{base}/api/chats?app=bench-list"
    runs = {
        "GET": lambda: wrk(get_url, seconds, connections, None, f"{name} GET"),
        "PUT": lambda: wrk(get_url, seconds, connections, lua_body("PUT", put_body), f"{name} PUT"),
        "POST": lambda: wrk(
            f"{base}/api/chats",
            seconds,
            connections,
            lua_body("POST", post_body, randomise_app=True),
            f"{name} POST",
        ),
        # A list is 100 chats: eight at once already keeps the server and S3 busy.
        "list 100 c=8": lambda: wrk(list_url, seconds, min(connections, 8), admin, f"{name} list"),
        "GET c=1": lambda: wrk(get_url, seconds, 1, None, f"{name} GET c=1"),
        "list 100 c=1": lambda: wrk(list_url, seconds, 1, admin, f"{name} list c=1"),
    }
    return {route: run() for route, run in runs.items() if not quick or route in QUICK_ROUTES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--quick", action="store_true", help="2 s runs: GET and the lists, no PostgreSQL"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed: measuring both on asyncio", file=sys.stderr)
        args.loop = "asyncio"
    quick = args.quick
    if not shutil.which("wrk"):
        print("bench/chats.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qp-bench-"))
    results: dict[str, dict[str, Result]] = {}
    (bare_port,) = free_ports()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port), args.loop])
    weed = SeaweedFS(work / "weed")
    try:
        wait_for_port(bare_port, 20, bare)
        bare_url = f"http://127.0.0.1:{bare_port}/"
        env = {"ADMIN_KEY": ADMIN_KEY, "QP_EVENT_LOOP": args.loop}
        server = QPServer(work / "qp-file", env).start()
        try:
            # Interleaved: bare, server, bare, server; each side's better run counts.
            bare_runs, file_runs = [], []
            for _ in range(2):
                bare_runs.append(wrk(bare_url, args.seconds, args.connections, None, "bare"))
                file_runs.append(bench_server("file", server, args.seconds, args.connections, True))
            results["bare"] = {
                "GET": max(bare_runs, key=lambda r: r.requests_per_second),
                "GET c=1": wrk(bare_url, args.seconds, 1, None, "bare c=1"),
            }
            results["file"] = bench_server("file", server, args.seconds, args.connections, quick)
            results["file"]["GET"] = max(
                [results["file"]["GET"], *(r["GET"] for r in file_runs)],
                key=lambda r: r.requests_per_second,
            )
        finally:
            server.stop()
        if PostgresServer.bindir() is not None and not quick:
            postgres = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-bench-pg-")), durable=True)
            postgres.start()
            pg_env = {**env, "QP_DATABASE": postgres.create_database()}
            server = QPServer(work / "qp-postgres", pg_env).start()
            try:
                results["postgres"] = bench_server(
                    "postgres", server, args.seconds, args.connections
                )
            finally:
                server.stop()
            # The same beside a second (idle) process on the database: now each cached
            # chat is checked against its row before it is served.
            pg_env = {**env, "QP_DATABASE": postgres.create_database()}
            server = QPServer(work / "qp-postgres-2", pg_env).start()
            peer = QPServer(work / "qp-postgres-peer", pg_env).start()
            try:
                results["pg+peer"] = bench_server("pg+peer", server, args.seconds, args.connections)
            finally:
                peer.stop()
                server.stop()
                postgres.stop()
                shutil.rmtree(postgres.data_dir, ignore_errors=True)
        weed.start()
        bucket = weed.create_bucket()
        server = QPServer(work / "qp-s3", {**env, **weed.server_env(bucket)}).start()
        try:
            results["s3"] = bench_server("s3", server, args.seconds, args.connections, quick)
        finally:
            server.stop()
        # The same with the chat cache off: every GET and list reads S3.
        cold_env = {**env, **weed.server_env(weed.create_bucket()), "QP_CACHE_MB": "0"}
        server = QPServer(work / "qp-s3-cold", cold_env).start()
        try:
            results["s3 cold"] = bench_server(
                "s3 cold", server, args.seconds, args.connections, quick
            )
        finally:
            server.stop()
    finally:
        bare.terminate()
        bare.wait()
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'backend':8} {'route':14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for backend, routes in results.items():
        for route, r in routes.items():
            print(
                f"{backend:8} {route:14} {r.requests_per_second:9.0f} {r.p50_ms:8.2f}"
                f" {r.p99_ms:8.2f} {r.errors:8d}"
            )
    print_table(results, args.connections, args.loop)
    if "postgres" in results:
        print("\nPostgreSQL vs SQLite (file blobs), req/s and p50:")
        for route in ("GET", "PUT", "POST", "GET c=1", "list 100 c=1"):
            lite = results["file"][route]
            for backend in ("postgres", "pg+peer"):
                pg = results[backend][route]
                print(
                    f"  {backend:9}{route:14}"
                    f" {pg.requests_per_second / lite.requests_per_second:5.2f}x req/s,"
                    f" p50 {pg.p50_ms:.2f} ms vs {lite.p50_ms:.2f} ms"
                    f" ({pg.p50_ms - lite.p50_ms:+.2f} ms)"
                )
    return 0


def print_table(results: dict[str, dict[str, Result]], connections: int, loop: str) -> None:
    """The rows `make bench` gathers: each measure against its baseline of this run."""
    bare, file, cold = results["bare"]["GET"], results["file"], results["s3 cold"]
    rows = [
        (
            f"GET one chat, file store, c={connections}, vs bare aiohttp ({loop})",
            f"{bare.requests_per_second:,.0f}/s",
            f"{file['GET'].requests_per_second:,.0f}/s",
            f"{file['GET'].requests_per_second / bare.requests_per_second:.2f}{TIMES}",
            f"≥ 0.75{TIMES}",
        ),
        (
            "S3 cold list of 100 vs one cold GET, p50 at c=1",
            f"{cold['GET c=1'].p50_ms:.2f} ms",
            f"{cold['list 100 c=1'].p50_ms:.2f} ms",
            f"{cold['list 100 c=1'].p50_ms / cold['GET c=1'].p50_ms:.1f}{TIMES}",
            f"≤ 3{TIMES}",
        ),
        (
            "file-store list of 100 vs one GET, p50 at c=1",
            f"{file['GET c=1'].p50_ms:.2f} ms",
            f"{file['list 100 c=1'].p50_ms:.2f} ms",
            f"{file['list 100 c=1'].p50_ms / file['GET c=1'].p50_ms:.1f}{TIMES}",
            "—",
        ),
    ]
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
