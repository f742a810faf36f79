"""`make bench`: every benchmark in one go, short runs, one table.

    .venv/bin/python bench/all.py [--only relay,chats,...] [--log DIR]

Runs each script below with `--quick`, one after another (each measures its own baseline in
the same run: the floor relay, the bare aiohttp handler, one cold GET, the code before a
change, SQLite beside PostgreSQL), keeps each one's whole output in `--log`, and prints the
rows each ends with as one table: measure, baseline, value, ratio, target. A script that
fails shows as a row saying so; the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("relay", "chats", "writes", "floors", "memory", "cache")
HEADER = "| measure | baseline | value | ratio | target |"


def rows_of(output: str) -> list[str]:
    """The table rows after the last header line of a script's output."""
    lines = output.splitlines()
    if HEADER not in lines:
        return []
    start = len(lines) - lines[::-1].index(HEADER)
    return [line for line in lines[start:] if line.startswith("| ") and "---" not in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCRIPTS))
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "qp-bench")
    args = parser.parse_args()
    args.log.mkdir(parents=True, exist_ok=True)
    table = [HEADER, "| --- | --- | --- | --- | --- |"]
    began = time.perf_counter()
    failed = False
    for name in args.only.split(","):
        log_file = args.log / f"{name}.log"
        started = time.perf_counter()
        print(f"bench/{name}.py --quick ...", flush=True)
        with log_file.open("w") as log:
            done = subprocess.run(
                [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        took = time.perf_counter() - started
        rows = rows_of(log_file.read_text())
        print(f"  {took:.0f} s, {len(rows)} rows, output in {log_file}", flush=True)
        if done.returncode != 0 or not rows:
            failed = True
            table.append(f"| bench/{name}.py failed (exit {done.returncode}) | | | | |")
        table.extend(rows)
    print(f"\nall benchmarks in {time.perf_counter() - began:.0f} s\n")
    print("\n".join(table))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
