"""SlowS3: a real HTTP proxy in front of SeaweedFS whose answers a test delays or holds.

Every request is passed on to SeaweedFS whole, Host header and all (so the client's
signature still holds), and SeaweedFS's answer passed back. A test can make requests of a
method wait before they are passed on (`delay_before`), or after SeaweedFS has answered and
before the answer goes back (`delay_after`, `hold`): an S3 that lands a PUT but answers
late. It serves from a thread of its own, so a test drives it from sync or async code.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# What is not passed on either way (hop by hop, or set again by aiohttp).
_DROPPED = {"transfer-encoding", "connection", "keep-alive", "content-length"}


@dataclass
class MethodRule:
    delay_before: float = 0.0
    delay_after: float = 0.0
    # Set: answers wait (after SeaweedFS answered) until it is released.
    held: threading.Event | None = None
    # Paths of requests that reached the proxy (arrived), that SeaweedFS has answered
    # (landed), and that were answered to the client.
    arrived: list[str] = field(default_factory=list)
    landed: list[str] = field(default_factory=list)
    # SeaweedFS's status for each landed request, in the same order.
    statuses: list[int] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)


class SlowS3:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = 0
        self.rules: dict[str, MethodRule] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._landed = threading.Condition()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rule(self, method: str) -> MethodRule:
        return self.rules.setdefault(method, MethodRule())

    def delay(self, method: str, *, before: float = 0.0, after: float = 0.0) -> None:
        rule = self.rule(method)
        rule.delay_before, rule.delay_after = before, after

    def hold(self, method: str) -> threading.Event:
        """Hold the answers of `method` once SeaweedFS has given them; set the event to let
        them (and every later one) go."""
        event = threading.Event()
        self.rule(method).held = event
        return event

    def wait_landed(self, method: str, count: int, timeout: float = 30.0) -> bool:
        """Wait until SeaweedFS has answered `count` requests of `method`."""
        with self._landed:
            return self._landed.wait_for(lambda: len(self.rule(method).landed) >= count, timeout)

    def reset(self) -> None:
        for rule in self.rules.values():
            if rule.held is not None:
                rule.held.set()
        self.rules = {}

    async def _pass_on(self, request: web.Request) -> web.StreamResponse:
        rule = self.rule(request.method)
        rule.arrived.append(request.path)
        # The body is taken first: a request the client has sent whole is passed on even if
        # the client stops waiting meanwhile (as an S3 that received it may still store it).
        body = await request.read()
        if rule.delay_before:
            await asyncio.sleep(rule.delay_before)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as answer,
        ):
            content = await answer.read()
            status = answer.status
            answer_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _DROPPED}
        with self._landed:
            rule.landed.append(request.path)
            rule.statuses.append(status)
            self._landed.notify_all()
        if rule.delay_after:
            await asyncio.sleep(rule.delay_after)
        if rule.held is not None:
            await asyncio.get_running_loop().run_in_executor(None, rule.held.wait)
        rule.answered.append(request.path)
        return web.Response(status=status, body=content, headers=answer_headers)

    def start(self) -> SlowS3:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="slow-s3", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the slow S3 proxy did not start")
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._pass_on)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        self.reset()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
