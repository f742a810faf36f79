"""Two floors under issue 22's write targets, measured on this machine in one run.

    .venv/bin/python bench/floors.py [--seconds 5] [--rounds 2]

1. The disk: the file blob store's own durable write (`_write_atomically`: temp file,
   fsync, rename, fsync of the folder, and for a new chat its new folder fsynced into
   chats/) from 32 threads, with no server and no database. A POST of a new chat or a PUT
   on file blobs cannot go faster than this.
2. PostgreSQL's commit: POSTs and PUTs to one server.py on PostgreSQL with
   `synchronous_commit` on (the durable default) and off (commits that do not wait for
   the WAL's fsync), switched live by ALTER SYSTEM, interleaved, beside SQLite. Where the
   two PostgreSQL rows are alike, the commit's fsync is not what limits the rate, and
   grouping commits (which PostgreSQL's WAL already does across connections) cannot pay.

`--quick` (for `make bench`): one round of each, 2 s runs, ending with the rows of the bench
table (bench/all.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from writes import ROOT, TreeServer, post_script, put_chats, put_script, wrk

from qp.storage.blobs import _write_atomically
from tests.processes import PostgresServer

# As bench/writes.py: wrk's connections, each PUT connection updating a chat of its own.
CONNECTIONS = 32
BLOB = b'{"role":"user","content":"hello"},' * 60


def disk_floor(count: int, threads: int) -> tuple[float, float]:
    """(new chats' blobs per second, new revisions of those chats per second)."""
    root = Path(tempfile.mkdtemp(prefix="qp-bench-floor-"))
    try:
        (root / "chats").mkdir()
        paths = [root / "chats" / uuid.uuid4().hex / "r1.json" for _ in range(count)]
        rates = []
        for batch in (paths, [path.parent / "r2.json" for path in paths]):
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda path: _write_atomically(path, BLOB, root), batch))
            rates.append(count / (time.perf_counter() - started))
        return rates[0], rates[1]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def commit_floor(seconds: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Mode ("on", "off", "sqlite") -> (POST/s, PUT/s) of its last round; {} without
    PostgreSQL."""
    if PostgresServer.bindir() is None:
        print("PostgreSQL is not installed: no commit floor")
        return {}
    pg_dir = Path(tempfile.mkdtemp(prefix="qp-bench-floor-pg-"))
    work = Path(tempfile.mkdtemp(prefix="qp-bench-floor-"))
    postgres = PostgresServer(pg_dir, durable=True)
    servers: list[TreeServer] = []
    rates: dict[str, tuple[float, float]] = {}
    try:
        postgres.start()
        on_pg = TreeServer(ROOT, work / "pg", {"QP_DATABASE": postgres.create_database()})
        on_sqlite = TreeServer(ROOT, work / "sqlite", {})
        for server in (on_pg, on_sqlite):
            servers.append(server)  # stopped below even if it fails to start
            server.start()
        chat_ids = put_chats(servers, CONNECTIONS)
        for _ in range(rounds):
            for mode in ("on", "off", "sqlite"):
                server = on_sqlite if mode == "sqlite" else on_pg
                if mode != "sqlite":
                    postgres.psql(f"ALTER SYSTEM SET synchronous_commit = {mode}")
                    postgres.psql("SELECT pg_reload_conf()")
                posts = wrk(f"{server.url}/api/chats", seconds, CONNECTIONS, post_script())
                script = put_script(chat_ids)
                puts = wrk(f"{server.url}/", seconds, CONNECTIONS, script, CONNECTIONS)
                rates[mode] = (posts.requests_per_second, puts.requests_per_second)
                shown = "SQLite" if mode == "sqlite" else f"PostgreSQL synchronous_commit={mode}"
                print(
                    f"| {shown} | POST {posts.requests_per_second:.0f}/s"
                    f" | PUT {puts.requests_per_second:.0f}/s |",
                    flush=True,
                )
    finally:
        for server in servers:
            server.stop()
        postgres.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one 2 s round, the bench rows")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2, 1
    for _ in range(args.rounds):
        new, revisions = disk_floor(3000, CONNECTIONS)
        print(f"| disk floor, {CONNECTIONS} threads | new chats' blobs {new:.0f}/s", end="")
        print(f" | revisions {revisions:.0f}/s |")
    rates = commit_floor(args.seconds, args.rounds)
    print("\n| measure | baseline | value | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| disk floor: a new chat's blob alone (file store, {CONNECTIONS} threads, no server)"
        f" | — | {new:,.0f}/s | — | POST ≥ 2,000/s can go no faster |"
    )
    print(
        f"| disk floor: a new revision's blob alone | — | {revisions:,.0f}/s | — |"
        " PUT ≥ 1,500/s can go no faster |"
    )
    if rates:
        for n, route in enumerate(("POST", "PUT")):
            on, off = rates["on"][n], rates["off"][n]
            print(
                f"| {route} on PostgreSQL, commits not waiting for the disk vs waiting"
                f" | synchronous_commit=on {on:,.0f}/s | off {off:,.0f}/s | {off / on:.2f}x"
                " | near 1x: the commit's fsync is not the limit |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
