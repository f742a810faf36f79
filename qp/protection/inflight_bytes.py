"""InflightBytes: how many bytes of chats and request bodies the server holds in memory at once.

What a client sends decides how much a request needs (a 10 MiB body parses into up to 25
times that in Python objects); the limit (QP_MAX_INFLIGHT_MB) decides how much all
requests together may hold. A request asks before it allocates and waits its turn, first
come first served, while the limit is reached; it may give back what it no longer needs as
it goes, but never ask for more while holding some (no request can wait on another).
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiohttp import web


class Hold:
    """Bytes a request holds while in its `async with` block; `shrink_to` gives back what it
    no longer needs. (A class, not a generator: it is entered on every chat request.)"""

    __slots__ = ("_inflight", "nbytes")

    def __init__(self, inflight: InflightBytes, nbytes: int):
        self._inflight = inflight
        self.nbytes = nbytes

    async def __aenter__(self) -> Hold:
        await self._inflight._take(self.nbytes)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._inflight._give_back(self.nbytes)

    def shrink_to(self, nbytes: int) -> None:
        if nbytes < self.nbytes:
            self._inflight._give_back(self.nbytes - nbytes)
            self.nbytes = nbytes


class InflightBytes:
    """The bytes requests hold now, at most `max_bytes`, and the requests waiting for room."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def hold(self, nbytes: int) -> Hold:
        """Hold `nbytes` (at most `max_bytes`) until the `async with` block ends."""
        return Hold(self, max(0, min(nbytes, self.max_bytes)))

    async def _take(self, nbytes: int) -> None:
        if not self._waiting and self.in_use + nbytes <= self.max_bytes:
            self.in_use += nbytes
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((nbytes, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(nbytes)  # granted just as it was cancelled
            else:
                self._waiting.remove((nbytes, waiter))
                self._grant()
            raise

    def _give_back(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._grant()

    def _grant(self) -> None:
        """Wake waiters in order while the first one fits."""
        while self._waiting and self.in_use + self._waiting[0][0] <= self.max_bytes:
            nbytes, waiter = self._waiting.popleft()
            if not waiter.done():
                self.in_use += nbytes
                waiter.set_result(None)


# Bytes of chats and request bodies held in memory at once (QP_MAX_INFLIGHT_MB).
INFLIGHT_BYTES = web.AppKey("inflight_bytes", InflightBytes)
