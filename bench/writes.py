"""Benchmark the chat write path before and after copy-on-write (issue 19), in one run.

    .venv/bin/python bench/writes.py [--seconds 8] [--connections 32] [--before e664875]
                                     [--env NAME=VALUE ...]

"before" is the tree at commit e664875, the last before copy-on-write, checked out as a
detached git worktree in a temporary folder (removed at the end); "after" is this tree as it
is, uncommitted changes included. Each tree's `server.py` runs from its own root with this
same .venv/bin/python (the old code needs aiorwlock, no longer in requirements.txt).

On file blobs + SQLite (synchronous=FULL), S3 (SeaweedFS) + SQLite and file blobs +
PostgreSQL (durable defaults), wrk (Debian: `apt-get install -y wrk`) drives two routes,
before and after interleaved so that noise on the machine hits both alike:
- POST a new chat (the server picks its id; the app is one of 1,000, at random);
- PUT of a chat of its own from each connection (one wrk thread per connection).
Prints requests/s, p50 and p99 per route, backend and tree, the after/before ratios, and
the non-blank lines of Python in qp/chats/ and qp/storage/ of both trees.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/chats.py, beside this file: the chat sent, the POST script, a JSON request.
from chats import MESSAGES, lua_body, request

from tests.helpers import make_chat
from tests.processes import TEST_DEFAULTS, PostgresServer, SeaweedFS, free_ports, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "8cf191b"
# The last commit before copy-on-write, whose code needs aiorwlock.
BEFORE_COPY_ON_WRITE = "e664875"
TREES = ("before", "after")
FOLDERS = ("qp/chats", "qp/storage")
PUT_CHAT_PREFIX = "bench-put-"
SERVER_ENV = {
    **TEST_DEFAULTS,
    # POSTs spread over 1,000 apps already stay far below the limit; this makes sure.
    "QP_MAX_CHATS_PER_APP": "1000000",
}


@dataclass
class Measure:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str


@dataclass
class TreeServer:
    """`server.py` of one source tree, run from that tree's root on a free loopback port."""

    root: Path
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> TreeServer:
        self.data_dir.mkdir(parents=True)
        (self.port,) = free_ports()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("QP_", "OPENROUTER_", "AWS_")) and key != "ADMIN_KEY"
        }
        env.update({"QP_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1"})
        env.update({**SERVER_ENV, **self.env})
        command = [sys.executable, str(self.root / "server.py")]
        with open(self.data_dir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, timeout, self.process)
        except Exception as err:
            log_text = (self.data_dir / "server.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.root}/server.py did not start: {err}\n{log_text}") from None
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(url: str, seconds: int, connections: int, script: str, threads: int = 1) -> Measure:
    with tempfile.TemporaryDirectory(prefix="qp-bench-wrk-") as folder:
        lua = Path(folder) / "load.lua"
        lua.write_text(script)
        done = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
             "--latency", "-s", str(lua), url],
            capture_output=True, text=True,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    output = done.stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return Measure(
        float(_found(r"Requests/sec:\s+([\d.]+)", output)),
        _percentile(output, "50"),
        _percentile(output, "99"),
        int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors.group(1).strip() if socket_errors else "",
    )


def _found(pattern: str, output: str) -> str:
    match = re.search(pattern, output, re.M)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{output}")
    return match.group(1)


def _percentile(output: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if match is None:
        raise RuntimeError(f"no {which}% latency in wrk's output:\n{output}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def put_script(chat_ids: list[str]) -> str:
    """PUTs from one connection per wrk thread, each thread always updating its own chat."""
    head, tail = json.dumps({"chat": make_chat("__CHAT__", "bench", messages=MESSAGES)}).split(
        "__CHAT__"
    )
    ids = ", ".join(f'"{chat_id}"' for chat_id in chat_ids)
    return (
        f"local chats, threads = {{{ids}}}, 0\n"
        "function setup(thread)\n"
        "  threads = threads + 1\n"
        '  thread:set("chat", chats[threads])\n'
        "end\n"
        "function init(args)\n"
        '  wrk.method = "PUT"\n'
        '  wrk.path = "/api/chats/" .. chat\n'
        '  wrk.headers["Content-Type"] = "application/json"\n'
        f"  wrk.body = [=[{head}]=] .. chat .. [=[{tail}]=]\n"
        "end\n"
    )


def put_chats(servers: list[TreeServer], connections: int) -> list[str]:
    """One chat per connection for put_script to update, created on each server."""
    chat_ids = [f"{PUT_CHAT_PREFIX}{n:04d}" for n in range(1, connections + 1)]
    for server in servers:
        for chat_id in chat_ids:
            chat = make_chat(chat_id, "bench", messages=MESSAGES)
            request(f"{server.url}/api/chats", "POST", {"chat": chat})
    return chat_ids


def post_script() -> str:
    body = json.dumps({"chat": make_chat(app="__APP__", messages=MESSAGES)})
    return lua_body("POST", body, randomise_app=True)


def bench_backend(
    backend: str, servers: dict[str, TreeServer], seconds: int, connections: int
) -> dict[tuple[str, str], Measure]:
    """POST, then PUT, before and after interleaved: (route, tree) -> what wrk measured."""
    chat_ids = put_chats(list(servers.values()), connections)
    results = {}
    for route in ("POST", "PUT"):
        for tree in TREES:
            print(f"  {backend} {route} {tree} ...", file=sys.stderr, flush=True)
            server = servers[tree]
            if route == "POST":
                measure = wrk(f"{server.url}/api/chats", seconds, connections, post_script())
            else:
                script = put_script(chat_ids)
                measure = wrk(f"{server.url}/", seconds, connections, script, connections)
            results[(route, tree)] = measure
    return results


def python_lines(folder: Path) -> int:
    """Non-blank lines of the *.py files in a folder and below."""
    return sum(
        1
        for path in sorted(folder.rglob("*.py"))
        for line in path.read_text().splitlines()
        if line.strip()
    )


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def check_imports_from(root: Path) -> None:
    """The editable install maps `qp` to this tree: make sure a tree's own `qp` wins."""
    found = subprocess.run(
        [sys.executable, "-c", "import qp; print(qp.__file__)"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"run from {root}, `import qp` found {found}")


@contextlib.contextmanager
def worktree(commit: str, parent: Path) -> Iterator[Path]:
    """The tree at `commit`, checked out (detached) in a new folder under `parent`."""
    path = parent / f"tree-{commit}"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        with contextlib.suppress(RuntimeError):
            git("worktree", "remove", "--force", str(path))
        git("worktree", "prune")


def backend_env(
    backend: str, cleanup: contextlib.ExitStack, work: Path
) -> Callable[[], dict[str, str]] | None:
    """What each server of a backend needs (a bucket, a database of its own), starting
    what the backend runs on; None where it is not installed here."""
    if backend == "file":
        return dict
    if backend == "s3":
        weed = SeaweedFS(work / "weed")
        cleanup.callback(weed.stop)
        weed.start()
        return lambda: weed.server_env(weed.create_bucket())
    if PostgresServer.bindir() is None:
        return None
    # A folder of its own under /tmp: the postgres user must be able to enter it.
    pg_dir = Path(tempfile.mkdtemp(prefix="qp-bench-writes-pg-"))
    cleanup.callback(shutil.rmtree, pg_dir, ignore_errors=True)
    postgres = PostgresServer(pg_dir, durable=True)
    cleanup.callback(postgres.stop)
    postgres.start()
    return lambda: {"QP_DATABASE": postgres.create_database()}


def run(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    work = Path(tempfile.mkdtemp(prefix="qp-bench-writes-"))
    cleanup.callback(shutil.rmtree, work, ignore_errors=True)
    roots = {"before": cleanup.enter_context(worktree(args.before, work)), "after": ROOT}
    for root in roots.values():
        check_imports_from(root)
    lines = {tree: {f: python_lines(root / f) for f in FOLDERS} for tree, root in roots.items()}

    load_at_start = os.getloadavg()[0]
    results: dict[str, dict[tuple[str, str], Measure]] = {}
    skipped = []
    for backend in args.backends.split(","):
        # Closed when the backend is done; on an exception, by `cleanup` with the rest.
        backend_cleanup = cleanup.enter_context(contextlib.ExitStack())
        env_of = backend_env(backend, backend_cleanup, work / backend)
        if env_of is None:
            skipped.append(backend)
            continue
        servers = {}
        for tree, root in roots.items():
            extra = dict(setting.split("=", 1) for setting in args.env)
            server = TreeServer(root, work / backend / tree, {**env_of(), **extra})
            backend_cleanup.callback(server.stop)
            servers[tree] = server.start()
        results[backend] = bench_backend(backend, servers, args.seconds, args.connections)
        backend_cleanup.close()

    head = git("rev-parse", "--short", "HEAD")
    changed = " + uncommitted changes" if git("status", "--porcelain", "qp", "server.py") else ""
    print(
        f"\nbefore = {git('rev-parse', '--short', args.before)}, after = {head}{changed};"
        f" {args.connections} connections, {args.seconds} s each;"
        f" load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    columns = f"{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
    print(f"\n{'backend':9}{'route':6}{'tree':7}{columns}")
    for backend, measures in results.items():
        for (route, tree), m in measures.items():
            print(
                f"{backend:9}{route:6}{tree:7}{m.requests_per_second:9.0f}{m.p50_ms:9.2f}"
                f"{m.p99_ms:9.2f}{m.non_2xx:9d}"
                + (f"  socket errors: {m.socket_errors}" if m.socket_errors else "")
            )
    print(f"\nafter/before  {'req/s':>7}{'p50':>7}{'p99':>7}")
    for backend, measures in results.items():
        for route in ("POST", "PUT"):
            old, new = measures[(route, "before")], measures[(route, "after")]
            print(
                f"{backend:9}{route:5}"
                f"{new.requests_per_second / old.requests_per_second:6.2f}x"
                f"{new.p50_ms / old.p50_ms:6.2f}x{new.p99_ms / old.p99_ms:6.2f}x"
            )
    for backend in skipped:
        print(f"{backend}: skipped (not installed here)")

    print(f"\nnon-blank lines of *.py {'before':>8}{'after':>8}{'change':>8}")
    for folder in (*FOLDERS, "total"):
        old_lines, new_lines = (
            sum(lines[tree].values()) if folder == "total" else lines[tree][folder]
            for tree in TREES
        )
        name = folder if folder == "total" else f"{folder}/"
        print(f"{name:24}{old_lines:8d}{new_lines:8d}{new_lines - old_lines:+8d}")
    print_rows(results, git("rev-parse", "--short", args.before), args.connections)
    return 0


def print_rows(results: dict[str, dict[tuple[str, str], Measure]], before: str, c: int) -> None:
    """The rows of `make bench`'s table: each route's rate after vs before, and PostgreSQL's
    vs SQLite's (both after)."""
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    targets = {"POST": "≥ 2,000/s", "PUT": "≥ 1,500/s"}
    for backend, measures in results.items():
        for route, what in (("POST", "POST a new chat"), ("PUT", "PUT of different chats")):
            old, new = (measures[(route, tree)].requests_per_second for tree in TREES)
            store = {"file": "SQLite + file blobs", "s3": "SQLite + S3", "postgres": "PostgreSQL"}
            print(
                f"| {what}, durable, {store[backend]}, c={c} | {before}: {old:,.0f}/s"
                f" | {new:,.0f}/s | {new / old:.2f}x | {targets[route]} |"
            )
    if "postgres" in results and "file" in results:
        for route in ("POST", "PUT"):
            lite = results["file"][(route, "after")].requests_per_second
            pg = results["postgres"][(route, "after")].requests_per_second
            print(
                f"| {route} on PostgreSQL vs SQLite | SQLite {lite:,.0f}/s | {pg:,.0f}/s"
                f" | {pg / lite:.2f}x | ≥ 1.00x |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="per route and tree (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk's (default 32)")
    parser.add_argument(
        "--before", default=BEFORE_COMMIT, help=f"the commit to compare with ({BEFORE_COMMIT})"
    )
    parser.add_argument("--backends", default="file,s3,postgres")
    parser.add_argument(
        "--quick", action="store_true", help="4 s per route and tree, file blobs and PostgreSQL"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more environment for both trees' servers, e.g. QP_MAX_TOTAL_STORAGE_GB=100",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench/writes.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.quick:
        args.seconds, args.backends = 4, "file,postgres"
    if args.before == BEFORE_COPY_ON_WRITE and importlib.util.find_spec("aiorwlock") is None:
        print(
            "bench/writes.py: the code before copy-on-write needs aiorwlock:"
            f" {sys.executable} -m pip install aiorwlock==1.5.1",
            file=sys.stderr,
        )
        return 2

    # A SIGTERM unwinds like Ctrl-C does, so every process started is stopped.
    signal.signal(signal.SIGTERM, _interrupted)
    cleanup = contextlib.ExitStack()
    try:
        return run(args, cleanup)
    except KeyboardInterrupt:
        print("bench/writes.py: interrupted", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup.close()


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
