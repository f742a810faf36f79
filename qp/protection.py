"""Who is asking, and whether they may: client identity and the rate-limit middleware."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from qp.appkeys import IP_SALT, METRICS, POLICY, RATE_CLASSES, RATE_LIMITER
from qp.client_address import client_address, hash_client
from qp.db import Database
from qp.errors import too_many_requests
from qp.logs import CLIENT_HASH
from qp.rate_limits import RateLimiter
from qp.timestamps import format_iso, utc_now_iso

UNROUTED_RATE_CLASS = "chats"


@web.middleware
async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Names the client (as a salted hash) and applies its route's rate-limit class."""
    policy = request.app[POLICY].current
    client = hash_client(client_address(request, policy.trusted), request.app[IP_SALT])
    request[CLIENT_HASH] = client
    rate_class = request.app[RATE_CLASSES].get(request.match_info.route)
    if rate_class is None and request.match_info.http_exception is not None:
        # No such route (404, 405): counted like the chats routes, so probing costs too.
        rate_class = UNROUTED_RATE_CLASS
    if rate_class is not None:
        limiter, limit = request.app[RATE_LIMITER], policy.rate_limit(rate_class)
        # A class whose limits are off still refuses blocked clients; no need to count.
        if limit.is_limited:
            refusal = await limiter.check(client, rate_class, limit)
        else:
            refusal = limiter.blocked(client)
        if refusal is not None:
            request.app[METRICS].rate_limit_refusals.labels(rate_class, refusal.reason).inc()
            raise too_many_requests(refusal.retry_after, refusal.message)
    return await handler(request)


async def load_blocks(db: Database) -> dict[str, float]:
    """Client hash -> blocked until (epoch seconds), for the blocks in force."""
    return {
        client: datetime.fromisoformat(until).timestamp()
        for client, until in await db.active_blocks(utc_now_iso())
    }


async def open_rate_limiter(db: Database) -> RateLimiter:
    """A limiter that starts with the blocks in force and saves new ones to the database."""
    blocks = await load_blocks(db)

    async def save_block(client: str, until: float) -> None:
        await db.save_block(client, utc_now_iso(), format_iso(datetime.fromtimestamp(until, UTC)))

    return RateLimiter(blocks, save_block)
