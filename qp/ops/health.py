"""What operators look at: /healthz (do the database and the blob store take writes) and
/metrics (Prometheus text, for a token or loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from qp.chats.store import CHAT_STORE
from qp.completions.breakers import BREAKERS
from qp.config import CONFIG
from qp.errors import FULL, UNAVAILABLE, ApiError, StorageUnavailable, json_response
from qp.metrics import METRICS
from qp.policy.policy import POLICY
from qp.storage.database import DATABASE
from qp.storage.disk import DISK_SPACE

log = logging.getLogger("qp.ops.health")
HEALTH_CHECK_SECONDS = 5.0


async def healthz(request: web.Request) -> web.Response:
    """200 when the database and the blob store answer and take writes; 503 naming what
    does not, and why: `unavailable`, `full`, `read-only`, for the database file
    `deleted`, `replaced` or `damaged`, and `taken-over` once another server took a lock
    file of this one's."""
    checks = await health_checks(request.app)
    # Models that keep failing upstream are skipped, not a failure of this server's.
    skipped = request.app[BREAKERS].open_models(request.app[POLICY].current)
    breakers = {"openBreakers": skipped} if skipped else {}
    if all(state == "ok" for state in checks.values()):
        return json_response({"status": "ok", **breakers})
    return json_response(
        {"error": "Service unavailable", "status": "unavailable", "checks": checks, **breakers},
        503,
    )


async def health_checks(app: web.Application) -> dict[str, str]:
    """The state of the database and of the blob store: `ok` or what is wrong."""
    db = app[DATABASE]
    return {"database": db.damage or await _check(db.ping), "storage": await _storage_check(app)}


async def _storage_check(app: web.Application) -> str:
    space = app[DISK_SPACE]
    if space.below_floor() or space.reserve_used_up():
        return FULL
    store = app[CHAT_STORE]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(HEALTH_CHECK_SECONDS):
            await store.current_write_problem()
    if store.write_problem is not None:
        return store.write_problem
    return await _check(store.ping)


async def _check(ping: Callable[[], Awaitable[None]]) -> str:
    try:
        async with asyncio.timeout(HEALTH_CHECK_SECONDS):
            await ping()
    except (StorageUnavailable, TimeoutError) as err:
        log.warning("health check failed: %s", err or "timed out")
        return UNAVAILABLE
    return "ok"


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, for `Authorization: Bearer $QP_METRICS_TOKEN`; with no token set,
    for loopback peers that no proxy forwarded (spend by app is the operator's business)."""
    token = request.app[CONFIG].metrics_token
    if token is not None:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            raise ApiError(401, "Unauthorized")
    elif not _direct_from_loopback(request):
        raise ApiError(403, "Forbidden")
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "CF-Connecting-IP")


def _direct_from_loopback(request: web.Request) -> bool:
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False  # the unix socket: nginx, forwarding someone
    return peer.is_loopback and not any(h in request.headers for h in FORWARDING_HEADERS)
