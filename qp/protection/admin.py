"""The admin check shared by every admin route, and the block on guessing the admin key."""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from qp.errors import ApiError, too_many_requests
from qp.logs import CLIENT_HASH

log = logging.getLogger("qp.protection.admin")

WRONG_KEYS_BEFORE_BLOCK = 10
WRONG_KEY_WINDOW_SECONDS = 60.0
ADMIN_BLOCK_SECONDS = 3600.0


class AdminGuard:
    """Wrong admin keys are violations: WRONG_KEYS_BEFORE_BLOCK of them within a minute
    block that client from the admin routes for an hour (429), logged once. Memory is
    bounded: past `max_clients` the least recently seen are forgotten."""

    def __init__(self, clock: Callable[[], float] = time.time, max_clients: int = 10_000):
        self._clock = clock
        self._max_clients = max_clients
        self._wrong: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def check(self, client: str, given: str | None, admin_key: str | None) -> None:
        """Pass, or raise 429 for a blocked client, or 401 (counting a wrong key)."""
        now = self._clock()
        until = self._blocked.get(client)
        if until is not None:
            if until > now:
                raise too_many_requests(
                    math.ceil(until - now), "IP blocked due to excessive violations"
                )
            del self._blocked[client]
        if given is None:
            raise ApiError(401, "Unauthorized")
        if admin_key and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), admin_key.encode("utf-8", "surrogateescape")
        ):
            return
        self._note_wrong_key(client, now)
        raise ApiError(401, "Unauthorized")

    def _note_wrong_key(self, client: str, now: float) -> None:
        wrong = self._wrong.pop(client, None) or deque(maxlen=WRONG_KEYS_BEFORE_BLOCK)
        wrong.append(now)
        if len(wrong) == WRONG_KEYS_BEFORE_BLOCK and now - wrong[0] <= WRONG_KEY_WINDOW_SECONDS:
            self._blocked[client] = now + ADMIN_BLOCK_SECONDS
            _forget_oldest(self._blocked, self._max_clients)
            log.warning(
                "client %s sent %d wrong admin keys within a minute: admin routes refused"
                " to it for an hour",
                client,
                WRONG_KEYS_BEFORE_BLOCK,
            )
            return
        self._wrong[client] = wrong
        _forget_oldest(self._wrong, self._max_clients)


def _forget_oldest(table: OrderedDict[str, Any], keep: int) -> None:
    while len(table) > keep:
        table.popitem(last=False)


ADMIN_GUARD = web.AppKey("admin_guard", AdminGuard)


def require_admin(request: web.Request, admin_key: str | None) -> None:
    """401 unless `x-admin-key` equals the configured key (constant time); none configured:
    401. A client that keeps guessing is blocked from the admin routes (429)."""
    request.app[ADMIN_GUARD].check(
        request.get(CLIENT_HASH, "-"), request.headers.get("x-admin-key"), admin_key
    )
