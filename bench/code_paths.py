"""Count the qp/ files one request runs code in, from its handler down (the middlewares
left out): a chat created, a chat PUT, a completion streamed (against the fake OpenRouter,
paid by the server's key, with a daily budget on so a reservation is taken and settled).

    .venv/bin/python bench/code_paths.py [--list]

Prints, for each request, the number of files and (with --list) the files in the order
first entered. Also how many times the path climbs back up: a call from a module into one
in a layer above it (the layers of pyproject.toml's import-linter contract).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import sys
import tempfile
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from qp.app import create_app
from qp.config import load_config
from qp.policy.loader import load_policy
from qp.policy.policy import DEFAULT_CHEAP_MODELS, DEFAULT_REQUIRED_PHRASE_GROUPS
from tests.fake_openrouter import FakeOpenRouter
from tests.helpers import make_chat

ROOT = Path(__file__).resolve().parent.parent
QP = str(ROOT / "qp")
# (caller's file, or "" when not in qp/; callee's file) of each call into qp/.
Calls = list[tuple[str, str]]
TRACING: contextvars.ContextVar[Calls | None] = contextvars.ContextVar("tracing", default=None)
SYSTEM = " ".join(group[0] for group in DEFAULT_REQUIRED_PHRASE_GROUPS)


def layer_of() -> Callable[[str], int]:
    """A module path's layer (0 = top) by the contract in pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    layers = config["tool"]["importlinter"]["contracts"][0]["layers"]
    rank = {
        name.strip(): n for n, line in enumerate(layers) for name in line.replace("|", " ").split()
    }

    def layer(path: str) -> int:
        top = Path(path).relative_to(QP).parts[0].removesuffix(".py")
        return rank.get(top, len(rank))

    return layer


def profile(frame: FrameType, event: str, arg: Any) -> None:
    seen = TRACING.get()
    if seen is not None and event == "call" and frame.f_code.co_filename.startswith(QP):
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        seen.append((caller if caller.startswith(QP) else "", frame.f_code.co_filename))


@web.middleware
async def traced(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    seen: Calls = []
    token = TRACING.set(seen)
    try:
        return await handler(request)
    finally:
        TRACING.reset(token)
        request.app["traces"].append(seen)


def climbs(calls: Calls, layer: Callable[[str], int]) -> set[tuple[str, str]]:
    """The calls from a module into one of a layer above its own (a callback, a hook)."""
    return {(a, b) for a, b in calls if a and layer(b) < layer(a)}


async def run(show: bool) -> None:
    fake = FakeOpenRouter().start()
    with tempfile.TemporaryDirectory() as data:
        environ = {
            "QP_DATA_DIR": data,
            "OPENROUTER_API_KEY": "sk-bench",
            "QP_OPENROUTER_URL": fake.url,
            "QP_SERVER_DAILY_BUDGET_USD": "100",
        }
        config = load_config(environ)
        app = create_app(config, load_policy(environ, None))
        app.middlewares.append(traced)
        app["traces"] = []
        client = TestClient(TestServer(app))
        await client.start_server()
        sys.setprofile(profile)
        try:
            chat = make_chat(app="bench")
            created = await client.post("/api/chats", json={"chat": chat})
            chat_id = (await created.json())["chatId"]
            put = await client.put(
                f"/api/chats/{chat_id}", json={"chat": make_chat(chat_id, app="bench")}
            )
            assert put.status == 200, put.status
            completion = await client.post(
                "/api/completion",
                json={
                    "model": DEFAULT_CHEAP_MODELS[0],
                    "systemMessage": SYSTEM,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert completion.status == 200, (completion.status, await completion.text())
            await completion.read()
        finally:
            sys.setprofile(None)
            await client.close()
            fake.stop()
    layer = layer_of()
    names = ("POST /api/chats", "PUT /api/chats/{id}", "POST /api/completion")
    for name, calls in zip(names, app["traces"], strict=True):
        order = list(dict.fromkeys(callee for _, callee in calls))
        up = climbs(calls, layer)
        print(f"{name}: {len(order)} files; {len(up)} distinct calls climb back up a layer")
        if show:
            for path in order:
                print("   ", Path(path).relative_to(ROOT))
            for a, b in sorted(up):
                print("    up:", Path(a).relative_to(ROOT), "->", Path(b).relative_to(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="name the files")
    asyncio.run(run(parser.parse_args().list))


if __name__ == "__main__":
    main()
