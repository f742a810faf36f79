"""Rate limits: fixed windows per minute and per hour, per client and class, and blocks.

One process (SQLite) counts in memory (a restart forgives a minute's count); several
processes sharing PostgreSQL count there (qp/protection/shared_counts.py), so a limit holds
across all of them. Blocks live in the database, so a restart never lifts one. Clients are
known only by the salted hash of their address.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

REFUSALS_BEFORE_BLOCK = 10
REFUSAL_MEMORY_SECONDS = 3600
BLOCK_SECONDS = 24 * 3600
_LIMIT_PART = re.compile(r"\s*([0-9]+)\s*/\s*(minute|hour)\s*")
# The most requests a window may allow: PostgreSQL counts them in INTEGER columns
# (qp/protection/shared_counts.py), whose largest value is 2**31 - 1.
MAX_PER_WINDOW = 1_000_000_000


@dataclass(frozen=True)
class RateLimit:
    """Requests allowed per minute and per hour; None is no limit on that window."""

    per_minute: int | None
    per_hour: int | None

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """`N/minute,M/hour` (either part may be left out) or `off`; ValueError otherwise."""
        if text.strip().lower() == "off":
            return cls(None, None)
        counts: dict[str, int] = {}
        for part in text.split(","):
            match = _LIMIT_PART.fullmatch(part)
            if not match or match.group(2) in counts:
                raise ValueError(f"{text!r} is not N/minute,M/hour or off")
            digits = match.group(1).lstrip("0") or "0"
            if len(digits) > len(str(MAX_PER_WINDOW)) or int(digits) > MAX_PER_WINDOW:
                raise ValueError(f"{text!r}: a window allows from 0 to {MAX_PER_WINDOW} requests")
            counts[match.group(2)] = int(digits)
        return cls(counts.get("minute"), counts.get("hour"))

    @property
    def is_limited(self) -> bool:
        return self.per_minute is not None or self.per_hour is not None

    def __str__(self) -> str:
        parts = [f"{self.per_minute}/minute"] if self.per_minute is not None else []
        parts += [f"{self.per_hour}/hour"] if self.per_hour is not None else []
        return ",".join(parts) or "off"


@dataclass(frozen=True)
class RateRefusal:
    """A request the rate limits refuse: 429 with Retry-After, and which window refused it."""

    retry_after: int
    message: str
    reason: str  # minute, hour or blocked


SaveBlock = Callable[[str, float], Awaitable[None]]
# Why a request was refused: the window whose count is used up.
HOUR, MINUTE = "hour", "minute"


class Counts(Protocol):
    """Where requests and refusals are counted: this process's memory, or the database."""

    async def count(self, client: str, rate_class: str, limit: RateLimit, now: float) -> str | None:
        """Count the request if both windows have room; else HOUR or MINUTE (not counted)."""
        ...

    async def refused(self, client: str, now: float) -> int:
        """Note a refusal; answers the client's refusals in the last REFUSAL_MEMORY_SECONDS
        (at most REFUSALS_BEFORE_BLOCK are remembered)."""
        ...

    async def forget(self, client: str) -> None:
        """Forget the client's counts and refusals wherever they are kept (its block is
        being lifted)."""
        ...

    def forget_here(self, client: str) -> None:
        """Forget what this process holds of the client (another process lifted its block
        and forgot the rest)."""
        ...

    async def expire(self, now: float) -> None:
        """Let go of counts whose windows are over (housekeeping, every minute)."""
        ...

    @property
    def tracked(self) -> int:
        """Counters this process holds in memory."""
        ...

    @property
    def forgotten(self) -> int:
        """Clients forgotten past the memory's cap."""
        ...


class RateLimiter:
    """Counts requests per client and class in fixed windows, and blocks persistent
    offenders: REFUSALS_BEFORE_BLOCK refusals within an hour block a client for a day."""

    def __init__(
        self,
        blocks: dict[str, float],
        save_block: SaveBlock,
        clock: Callable[[], float] = time.time,
        max_clients: int = 100_000,
        counts: Counts | None = None,
    ):
        # client hash -> blocked until (epoch seconds); loaded from and saved to the database.
        self._blocks = blocks
        self._save_block = save_block
        self._clock = clock
        self._counts = counts or MemoryCounts(clock, max_clients)
        self.refusals_per_hour = RefusalsPerHour(clock)

    def blocked(self, client: str) -> RateRefusal | None:
        """The refusal of a blocked client (whatever the limits of the route)."""
        blocked_until = self._blocks.get(client)
        if blocked_until is None:
            return None
        now = self._clock()
        if blocked_until <= now:
            del self._blocks[client]
            return None
        return RateRefusal(
            math.ceil(blocked_until - now), "IP blocked due to excessive violations", "blocked"
        )

    async def check(self, client: str, rate_class: str, limit: RateLimit) -> RateRefusal | None:
        """Count the request, or say why it is refused."""
        refusal = self.blocked(client)
        if refusal is not None or not limit.is_limited:
            return refusal
        now = self._clock()
        window = await self._counts.count(client, rate_class, limit, now)
        if window is None:
            return None
        if window == HOUR:
            refusal = RateRefusal(
                3600, f"Rate limit exceeded: {limit.per_hour} requests per hour", HOUR
            )
        else:
            refusal = RateRefusal(
                60, f"Rate limit exceeded: {limit.per_minute} requests per minute", MINUTE
            )
        if await self._counts.refused(client, now) >= REFUSALS_BEFORE_BLOCK:
            until = now + BLOCK_SECONDS
            self._blocks[client] = until
            await self._save_block(client, until)
        return refusal

    async def forget(self, client: str) -> None:
        """Forget a client's counts and refusals: its block is being lifted (see
        qp/protection/blocks.py `lift_block`)."""
        await self._counts.forget(client)

    def unblock(self, client: str) -> None:
        """Serve a client again at once: its block was lifted."""
        self._blocks.pop(client, None)
        self._counts.forget_here(client)

    async def expire(self) -> None:
        await self._counts.expire(self._clock())

    def replace_blocks(self, blocks: dict[str, float]) -> None:
        """Take the blocks in force as the database has them (an operator lifted one,
        another process made one). A client whose block ended early was lifted: what this
        process counted of it is forgotten too, as where it was lifted."""
        now = self._clock()
        for client, until in self._blocks.items():
            if client not in blocks and until > now:
                self._counts.forget_here(client)
        self._blocks = blocks

    @property
    def tracked(self) -> int:
        """Counters this process holds now (one per client and class; 0 when shared)."""
        return self._counts.tracked

    @property
    def forgotten(self) -> int:
        return self._counts.forgotten


class MemoryCounts:
    """Counts in this process's memory, bounded whatever the number of clients: counters
    are kept in the order their clients were last seen; each count drops a few of the
    oldest whose windows are over, and past `max_clients` the least recently seen go first
    (`forgotten` counts them; a forgotten client merely starts its windows afresh)."""

    PURGE_PER_CHECK = 4

    def __init__(self, clock: Callable[[], float], max_clients: int):
        self._clock = clock
        self._max_clients = max_clients
        # (client hash, class) -> [minute window, count in it, hour window, count in it]
        self._counters: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        # client hash -> times of its latest refusals, least recently refused first
        self._refusals: OrderedDict[str, deque[float]] = OrderedDict()
        self._forgotten = 0

    async def count(self, client: str, rate_class: str, limit: RateLimit, now: float) -> str | None:
        minute, hour = int(now // 60), int(now // 3600)
        key = (client, rate_class)
        counter = self._counters.pop(key, None)
        if counter is None:
            counter = [minute, 0, hour, 0]
        if counter[0] != minute:
            counter[0], counter[1] = minute, 0
        if counter[2] != hour:
            counter[2], counter[3] = hour, 0
        self._counters[key] = counter  # now the most recently seen, and in this hour
        self._purge(hour)
        if limit.per_hour is not None and counter[3] >= limit.per_hour:
            return HOUR
        if limit.per_minute is not None and counter[1] >= limit.per_minute:
            return MINUTE
        counter[1] += 1
        counter[3] += 1
        return None

    async def refused(self, client: str, now: float) -> int:
        refusals = self._refusals.pop(client, None) or deque(maxlen=REFUSALS_BEFORE_BLOCK)
        refusals.append(now)
        while refusals and now - refusals[0] > REFUSAL_MEMORY_SECONDS:
            refusals.popleft()
        if len(refusals) >= REFUSALS_BEFORE_BLOCK:
            return len(refusals)  # blocked now: nothing more to remember
        self._refusals[client] = refusals
        while len(self._refusals) > self._max_clients:
            self._refusals.popitem(last=False)
        return len(refusals)

    def _purge(self, hour: int) -> None:
        """Drop the oldest counters whose hour is over, a few at a time, and any over the cap."""
        for _ in range(self.PURGE_PER_CHECK):
            oldest = next(iter(self._counters.values()))
            if oldest[2] == hour:
                break
            self._counters.popitem(last=False)
        while len(self._counters) > self._max_clients:
            self._counters.popitem(last=False)
            self._forgotten += 1
        if self._refusals:
            key, refusals = next(iter(self._refusals.items()))
            if not refusals or refusals[-1] < self._clock() - REFUSAL_MEMORY_SECONDS:
                del self._refusals[key]

    async def expire(self, now: float) -> None:
        """Nothing: each count drops a few counters that are over (`_purge`)."""

    async def forget(self, client: str) -> None:
        self.forget_here(client)

    def forget_here(self, client: str) -> None:
        self._refusals.pop(client, None)
        for key in [key for key in self._counters if key[0] == client]:
            del self._counters[key]

    @property
    def tracked(self) -> int:
        return len(self._counters)

    @property
    def forgotten(self) -> int:
        return self._forgotten


class RefusalsPerHour:
    """How many requests were refused in each hour of the last HOURS_KEPT (in memory: a
    restart starts from nothing)."""

    HOURS_KEPT = 48

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._counts: OrderedDict[int, int] = OrderedDict()  # hour since the epoch -> count

    def add(self) -> None:
        hour = int(self._clock() // 3600)
        self._counts[hour] = self._counts.get(hour, 0) + 1
        while next(iter(self._counts)) <= hour - self.HOURS_KEPT:
            self._counts.popitem(last=False)

    def last(self, hours: int = HOURS_KEPT) -> list[tuple[int, int]]:
        """(hour start in epoch seconds, refusals) for the last `hours` hours, this one last."""
        now = int(self._clock() // 3600)
        hours_shown = range(now - hours + 1, now + 1)
        return [(hour * 3600, self._counts.get(hour, 0)) for hour in hours_shown]


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Route -> rate-limit class ("chats", "completion"); routes not in it are not limited.
RATE_CLASSES = web.AppKey("rate_classes", dict)
