"""A fake OpenRouter: a real HTTP server that records what it receives and streams scripted
SSE with delays.

The script for a request is picked by its last message's content, `script:NAME`; anything
else gets the standard stream. Tests run it in a thread of their own; benchmarks run it as
a process: `python -m tests.fake_openrouter --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

# A normal completion, cut into chunks at awkward places: inside a line, inside a JSON
# string and inside a multi-byte UTF-8 character.
STANDARD_STREAM = [
    b": OPENROUTER PROCESSING\n\n",
    b'data: {"id":"gen-1","choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"id":"gen-1","ch',
    b'oices":[{"delta":{"content":"lo \xe2\x9c',
    b'\x93 w\xc3\xb6rld"}}]}\n\n',
    b'data: {"id":"gen-1","choices":[{"delta":{},"finish_reason":"stop"}],"usage":'
    b'{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"cost":0.00042}}\n\n',
    b"data: [DONE]\n\n",
]


@dataclass
class Script:
    """How the fake answers: status, a delay before the headers, then timed chunks."""

    status: int = 200
    reason: str | None = None
    body: bytes = b""
    # An error answer's headers (Retry-After); with `stall_body`, its body never ends.
    headers: dict[str, str] = field(default_factory=dict)
    stall_body: bool = False
    # The answers to the first requests of this script, one each, before its own.
    failures: list[Script] = field(default_factory=list)
    headers_delay: float = 0.0
    chunks: list[tuple[float, bytes]] = field(
        default_factory=lambda: [(0.0, chunk) for chunk in STANDARD_STREAM]
    )
    # After the chunks: stay silent this long, then end normally.
    hold: float = 0.0
    # After the chunks: drop the connection without ending the response.
    die: bool = False
    # Bill the stream per token as OpenRouter does (see FakeOpenRouter.bill); in its
    # chunks GEN_ID is the generation id and a chunk USAGE the usage of what was sent.
    billed: bool = False
    # A chunk GATE waits here until this is set (a test lets the stream go on); an error
    # answer waits for it before it is sent.
    gate: threading.Event | None = None


@dataclass
class Generation:
    """What the fake billed for one generation, and how many lookups it answers 404 first
    (OpenRouter needs a moment before a generation can be looked up)."""

    total_cost: float
    tokens_prompt: int
    tokens_completion: int
    not_ready: int = 0


@dataclass
class Received:
    """One request as the fake saw it; times are time.monotonic()."""

    headers: dict[str, str]
    body: dict
    started: float
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    finished: float | None = None
    disconnected: float | None = None
    # A billed stream's generation id, and the content chunks (tokens) it sent.
    generation_id: str | None = None
    tokens_sent: int = 0


# What the fake bills per token for a billed stream, in USD.
PROMPT_PRICE = 0.000001
COMPLETION_PRICE = 0.000004


def billed_stream(
    tokens: int, then: float = 0.0, die: bool = False, gate: threading.Event | None = None
) -> Script:
    """A billed stream of `tokens` content chunks at once; then, after `then` seconds (and
    once `gate` is set, if given), its usage and the end, or with `die`, a dropped
    connection."""
    token = b'data: {"id":"GEN_ID","choices":[{"delta":{"content":"tok "}}]}\n\n'
    chunks = [(0.0, token)] * tokens + ([(0.0, b"GATE")] if gate is not None else [])
    if not die:
        chunks += [(then, b"USAGE"), (0.0, b"data: [DONE]\n\n")]
    return Script(chunks=chunks, die=die, billed=True, gate=gate)


class FakeOpenRouter:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        # A request for one of these models gets its script, whatever its messages.
        self.model_scripts: dict[str, Script] = {}
        self.received: list[Received] = []
        # Generation id -> what was billed for it; and each lookup: (id, key, status).
        self.generations: dict[str, Generation] = {}
        self.lookups: list[tuple[str, str, int]] = []
        # The model list: (model, prompt, completion) prices as strings; its status.
        self.models: list[tuple[str, str, str]] = []
        self.models_status = 200
        self.model_list_requests = 0
        # While set, every generation lookup answers 404 (not yet known).
        self.lookups_paused = False
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/chat/completions"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v1/chat/completions", self._complete)
        app.router.add_get("/api/v1/generation", self._generation)
        app.router.add_get("/api/v1/models", self._models)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        self.model_list_requests += 1
        if self.models_status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.models_status)
        data = [
            {"id": model, "pricing": {"prompt": prompt, "completion": completion}}
            for model, prompt, completion in self.models
        ]
        return web.json_response({"data": data})

    async def _generation(self, request: web.Request) -> web.Response:
        generation_id = request.query.get("id", "")
        key = request.headers.get("Authorization", "")
        billed = self.generations.get(generation_id)
        if billed is None or billed.not_ready > 0 or self.lookups_paused:
            if billed is not None and not self.lookups_paused:
                billed.not_ready -= 1
            self.lookups.append((generation_id, key, 404))
            return web.json_response({"error": {"message": "not found"}}, status=404)
        self.lookups.append((generation_id, key, 200))
        data = {
            "id": generation_id,
            "total_cost": billed.total_cost,
            "tokens_prompt": billed.tokens_prompt,
            "tokens_completion": billed.tokens_completion,
        }
        return web.json_response({"data": data})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        seen = Received(dict(request.headers), body, time.monotonic())
        self.received.append(seen)
        script = self.model_scripts.get(str(body.get("model")))
        script = script or self.scripts.get(_script_name(body), Script())
        if script.failures:
            script = script.failures.pop(0)
        if script.billed:
            seen.generation_id = f"gen-fake-{len(self.received)}"
        try:
            await asyncio.sleep(script.headers_delay)
            if script.status != 200 and script.gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, script.gate.wait, 60)
            if script.status != 200 and script.stall_body:
                stalled = web.StreamResponse(status=script.status, headers=script.headers)
                await stalled.prepare(request)
                await asyncio.sleep(3600)
            if script.status != 200:
                return web.Response(
                    status=script.status,
                    reason=script.reason,
                    body=script.body,
                    headers=script.headers,
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for delay, chunk in script.chunks:
                await asyncio.sleep(delay)
                if chunk == b"GATE" and script.gate is not None:
                    await asyncio.get_running_loop().run_in_executor(None, script.gate.wait, 60)
                    continue
                if seen.generation_id is not None:
                    chunk = self._billed_chunk(seen, chunk)
                await response.write(chunk)
                seen.sent.append((time.monotonic(), chunk))
            if script.die:
                request.transport.abort()
                return response
            await asyncio.sleep(script.hold)
            await response.write_eof()
            seen.finished = time.monotonic()
            return response
        except asyncio.CancelledError:
            seen.disconnected = time.monotonic()
            raise
        except ConnectionError:
            seen.disconnected = time.monotonic()
            return web.Response(status=499)
        finally:
            if seen.generation_id is not None:
                self.generations[seen.generation_id] = self.bill(seen)

    def bill(self, seen: Received) -> Generation:
        """What a billed stream costs: its prompt at a token per 4 characters of the
        messages, and each content chunk it sent as a completion token."""
        characters = sum(len(str(message.get("content", ""))) for message in seen.body["messages"])
        prompt_tokens = characters // 4
        cost = prompt_tokens * PROMPT_PRICE + seen.tokens_sent * COMPLETION_PRICE
        return Generation(cost, prompt_tokens, seen.tokens_sent)

    def _billed_chunk(self, seen: Received, chunk: bytes) -> bytes:
        assert seen.generation_id is not None
        if chunk == b"USAGE":
            billed = self.bill(seen)
            usage = {
                "id": seen.generation_id,
                "choices": [],
                "usage": {
                    "prompt_tokens": billed.tokens_prompt,
                    "completion_tokens": billed.tokens_completion,
                    "cost": billed.total_cost,
                },
            }
            return b"data: " + orjson.dumps(usage) + b"\n\n"
        if b'"content"' in chunk:
            seen.tokens_sent += 1
        return chunk.replace(b"GEN_ID", seen.generation_id.encode())

    def start(self) -> FakeOpenRouter:
        """Serve from a thread of its own, on a free port of 127.0.0.1."""
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-openrouter", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake OpenRouter did not start")
        return self

    async def _start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def last(self) -> Received:
        return self.received[-1]

    def wait_for(self, predicate, seconds: float = 5.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()


def _script_name(body: dict) -> str | None:
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    if isinstance(content, str) and content.startswith("script:"):
        return content[len("script:") :]
    return None


def bench_scripts() -> dict[str, Script]:
    """Scripts the relay benchmark asks for by name."""
    token = b'data: {"id":"gen-b","choices":[{"delta":{"content":"token "}}]}\n\n'
    usage = (
        b'data: {"id":"gen-b","choices":[],"usage":{"prompt_tokens":10,'
        b'"completion_tokens":200,"cost":0.0001}}\n\ndata: [DONE]\n\n'
    )
    return {
        # 100 tokens, 10 ms apart (a fast model): time to first chunk, a realistic stream.
        "paced": Script(chunks=[(0.01, token)] * 100 + [(0.0, usage)]),
        # The first token 10 ms in, then the end: time to first chunk, quickly.
        "first": Script(chunks=[(0.01, token), (0.0, usage)]),
        # 8 MiB as fast as it can go, 16 KiB a write: throughput.
        "bulk": Script(chunks=[(0.0, token * 240)] * 512 + [(0.0, usage)]),
        # One chunk, then an open stream for a minute: memory per open stream.
        "hold": Script(chunks=[(0.0, token)], hold=60.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenRouter for benchmarks")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    fake = FakeOpenRouter()
    fake.scripts.update(bench_scripts())
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
