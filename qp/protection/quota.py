"""DailyQuota: how many bytes of chat messages each client may store per UTC day.

Kept in memory like the rate-limit counters (a restart forgives the day so far), for at
most `max_clients` clients at once, the least recently seen forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from qp.errors import ApiError, format_size

DAY_SECONDS = 86400


class DailyQuota:
    def __init__(self, clock: Callable[[], float] = time.time, max_clients: int = 100_000):
        self._clock = clock
        self._max_clients = max_clients
        self._day = -1
        self._used: OrderedDict[str, int] = OrderedDict()

    def take(self, client: str, size: int, limit: int) -> None:
        """Count `size` bytes against the client's day, or raise 429 when they do not fit
        (`limit` 0: no quota)."""
        if not limit:
            return
        now = self._clock()
        day = int(now // DAY_SECONDS)
        if day != self._day:
            self._day = day
            self._used.clear()
        used = self._used.pop(client, 0)
        if used + size > limit:
            self._used[client] = used
            retry_after = math.ceil((day + 1) * DAY_SECONDS - now)
            raise ApiError(
                429,
                "Storage quota exceeded",
                headers={"Retry-After": str(retry_after)},
                retryAfter=retry_after,
                message=f"Chat storage quota exceeded: {format_size(limit)} per day",
            )
        self._used[client] = used + size
        while len(self._used) > self._max_clients:
            self._used.popitem(last=False)

    def give_back(self, client: str, size: int) -> None:
        """Uncount bytes taken for a write that did not happen."""
        if client in self._used:
            self._used[client] = max(0, self._used[client] - size)


# Bytes of chats each client stored today.
DAILY_QUOTA = web.AppKey("daily_quota", DailyQuota)
