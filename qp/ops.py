"""What operators look at: /healthz, /metrics, and the middleware that measures requests."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from qp.appkeys import CHAT_STORE, DATABASE, METRICS
from qp.errors import StorageUnavailable, json_response
from qp.logs import route_name
from qp.metrics import CLIENT_LEFT, KNOWN_METHODS

log = logging.getLogger("qp.ops")
HEALTH_CHECK_SECONDS = 5.0


@web.middleware
async def observe_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Counts and times every request by route pattern, method and final status."""
    started = time.monotonic()
    status = CLIENT_LEFT
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        method = request.method if request.method in KNOWN_METHODS else "OTHER"
        count, duration = request.app[METRICS].request_series(route_name(request), method, status)
        count.inc()
        duration.observe(time.monotonic() - started)


async def healthz(request: web.Request) -> web.Response:
    """200 when the database and the blob store answer; 503 naming what does not."""
    checks = {
        "database": await _check(request.app[DATABASE].ping),
        "storage": await _check(request.app[CHAT_STORE].ping),
    }
    if all(state == "ok" for state in checks.values()):
        return json_response({"status": "ok"})
    return json_response(
        {"error": "Service unavailable", "status": "unavailable", "checks": checks}, 503
    )


async def _check(ping) -> str:
    try:
        async with asyncio.timeout(HEALTH_CHECK_SECONDS):
            await ping()
    except (StorageUnavailable, TimeoutError) as err:
        log.warning("health check failed: %s", err or "timed out")
        return "unavailable"
    return "ok"


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
