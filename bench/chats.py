"""Benchmark the /api/chats routes on both blob backends and both databases against a bare
aiohttp app, in one run.

    .venv/bin/python bench/chats.py [--seconds 8] [--connections 32]

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
    import sys
    from aiohttp import web

    async def hello(request):
        return web.json_response({"ok": True, "name": "bare"})

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
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


def bench_server(name: str, server: QPServer, seconds: int, connections: int) -> dict[str, Result]:
    base = server.url
    chat_id = "benchChat0000000000001"
    request(f"{base}/api/chats", "POST", {"chat": make_chat(chat_id, "bench", messages=MESSAGES)})
    for _ in range(100):
        request(
            f"{base}/api/chats", "POST", {"chat": make_chat(app="bench-list", messages=MESSAGES)}
        )
    put_body = json.dumps({"chat": make_chat(chat_id, "bench", messages=MESSAGES)})
    post_body = json.dumps({"chat": make_chat(app="__APP__", messages=MESSAGES)})
    admin = f'wrk.headers["x-admin-key"] = "{ADMIN_KEY}"\n'
    get_url, list_url = f"{base}/api/chats/{chat_id}", f"{base}/api/chats?app=bench-list"
    return {
        "GET": wrk(get_url, seconds, connections, None, f"{name} GET"),
        "PUT": wrk(get_url, seconds, connections, lua_body("PUT", put_body), f"{name} PUT"),
        "POST": wrk(
            f"{base}/api/chats",
            seconds,
            connections,
            lua_body("POST", post_body, randomise_app=True),
            f"{name} POST",
        ),
        # A list is 100 chats: eight at once already keeps the server and S3 busy.
        "list 100 c=8": wrk(list_url, seconds, min(connections, 8), admin, f"{name} list"),
        "GET c=1": wrk(get_url, seconds, 1, None, f"{name} GET c=1"),
        "list 100 c=1": wrk(list_url, seconds, 1, admin, f"{name} list c=1"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench/chats.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qp-bench-"))
    results: dict[str, dict[str, Result]] = {}
    (bare_port,) = free_ports()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port)])
    weed = SeaweedFS(work / "weed")
    try:
        wait_for_port(bare_port, 20, bare)
        bare_url = f"http://127.0.0.1:{bare_port}/"
        results["bare"] = {
            "GET": wrk(bare_url, args.seconds, args.connections, None, "bare"),
            "GET c=1": wrk(bare_url, args.seconds, 1, None, "bare c=1"),
        }
        env = {"ADMIN_KEY": ADMIN_KEY}
        server = QPServer(work / "qp-file", env).start()
        try:
            results["file"] = bench_server("file", server, args.seconds, args.connections)
        finally:
            server.stop()
        if PostgresServer.bindir() is not None:
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
            results["s3"] = bench_server("s3", server, args.seconds, args.connections)
        finally:
            server.stop()
        # The same with the chat cache off: every GET and list reads S3.
        cold_env = {**env, **weed.server_env(weed.create_bucket()), "QP_CACHE_MB": "0"}
        server = QPServer(work / "qp-s3-cold", cold_env).start()
        try:
            results["s3 cold"] = bench_server("s3 cold", server, args.seconds, args.connections)
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
    bare_rps = results["bare"]["GET"].requests_per_second
    get_ratio = results["file"]["GET"].requests_per_second / bare_rps
    cold = results["s3 cold"]
    list_ratio = cold["list 100 c=1"].p50_ms / cold["GET c=1"].p50_ms
    print(
        f"\nGET one chat (file store) vs bare app, req/s at c={args.connections}: "
        f"{get_ratio:.2f}x (target >= 0.50)"
    )
    print(
        "S3, cache off: list of 100 chats vs one GET, p50 latency at c=1:"
        f" {list_ratio:.2f}x (target <= 3)"
    )
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


if __name__ == "__main__":
    sys.exit(main())
