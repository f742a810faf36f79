"""Where a server.py spends its time under load: py-spy samples it from outside.

    .venv/bin/python bench/profile.py --route relay|get [--seconds 10] [--tree PATH]
                                      [--loop uvloop|asyncio] [--top 20]

Starts the fake OpenRouter (as its own process) and a server.py (of this tree, or of
another checkout given by --tree, for a "before" profile), drives it with wrk for
`--seconds` (`relay`: streamed completions paid by the server's key, 100 connections;
`get`: GETs of one chat, 32 connections; `post`: new chats, 32 connections) while
`py-spy record` samples it, and prints the
top entries by own time (the frame running) and by total time (the frame on the stack),
as shares of all samples.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from qp.policy.policy import DEFAULT_REQUIRED_PHRASE_GROUPS
from tests.helpers import make_chat
from tests.processes import TEST_DEFAULTS, free_ports, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = " ".join(group[0] for group in DEFAULT_REQUIRED_PHRASE_GROUPS)
MODEL = "bench/model"
CHAT_ID = "profileChat00000000001"


def lua(method: str, body: str) -> str:
    return (
        f'wrk.method = "{method}"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{body}]]\n"
    )


def start(root: Path, data: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    (port,) = free_ports()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QP_", "OPENROUTER_"))}
    clean.update({"QP_DATA_DIR": str(data), **TEST_DEFAULTS, **env})
    log = open(data.parent / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [sys.executable, str(root / "server.py"), "--port", str(port)],
        cwd=root, env=clean, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port, 30, process)
    return process, port


def top(raw: str, count: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, total) shares by frame from py-spy's raw output (`stack;frames count`)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        samples += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            total[frame] += int(n)
    share = 100 / max(1, samples)
    return (
        [(frame, n * share) for frame, n in own.most_common(count)],
        [(frame, n * share) for frame, n in total.most_common(count)],
    )


def _short(frame: str) -> str:
    """`function (path/to/file.py:line)` with the path cut to what says where it is."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in ("/site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=("relay", "get", "post"), default="relay")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qp-profile-"))
    (fake_port,) = free_ports()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openrouter", "--port", str(fake_port)], cwd=ROOT
    )
    processes = [fake]
    try:
        wait_for_port(fake_port, 30, fake)
        upstream = f"http://127.0.0.1:{fake_port}/api/v1/chat/completions"
        env = {
            "QP_OPENROUTER_URL": upstream,
            "OPENROUTER_API_KEY": "profile-key",
            "QP_CHEAP_MODELS": MODEL,
            "QP_EVENT_LOOP": args.loop,
            # New chats of one app, for as long as the profile runs.
            "QP_MAX_CHATS_PER_APP": "1000000",
        }
        server, port = start(args.tree, work / "data", env)
        processes.append(server)
        base = f"http://127.0.0.1:{port}"
        if args.route == "relay":
            body = {
                "model": MODEL,
                "systemMessage": SYSTEM,
                "messages": [{"role": "user", "content": "hi"}],
                "app": "profile-app",
            }
            url, script, connections = f"{base}/api/completion", lua("POST", json.dumps(body)), 100
        elif args.route == "post":
            body = json.dumps({"chat": make_chat(app="profile-app")})
            url, script, connections = f"{base}/api/chats", lua("POST", body), 32
        else:
            chat = json.dumps({"chat": make_chat(CHAT_ID, "profile-app")}).encode()
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{base}/api/chats", chat, {"Content-Type": "application/json"}, method="POST"
                ),
                timeout=10,
            ).read()
            url, script, connections = f"{base}/api/chats/{CHAT_ID}", lua("GET", ""), 32
        (work / "load.lua").write_text(script)
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{args.seconds + 2}s", "-s",
             str(work / "load.lua"), url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        raw = work / "profile.txt"
        subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid),
             "--duration", str(args.seconds), "--format", "raw", "--rate", "250",
             "--nonblocking", "-o", str(raw)],
            check=True, capture_output=True,
        )  # fmt: skip
        load, _ = wrk.communicate()
        rate = next((line for line in load.splitlines() if "Requests/sec" in line), "")
        own, total = top(raw.read_text(), args.top)
        print(f"{args.route} on {args.tree} ({args.loop}), {args.seconds} s; wrk {rate.strip()}")
        for title, entries in (("own time", own), ("total time", total)):
            print(f"\ntop {len(entries)} by {title}:")
            for frame, share in entries:
                print(f"  {share:5.1f}%  {frame}")
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
