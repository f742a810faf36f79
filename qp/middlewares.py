"""The one middleware every request passes through (app.py installs it), doing in order:

1. observe: counts and times the request, whatever became of it;
2. rate limits: names the client (as a salted hash) and applies its route's rate limit;
3. errors: turns every failure, a refusal of 2. included, into the contract's JSON answer
   (`error_answer`), so a refusal is counted and timed like any answer.

One middleware rather than three: each layer of aiohttp's chain cost a cached GET more
than the work inside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from qp.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    STORAGE_UNAVAILABLE,
    ApiError,
    StorageUnavailable,
    UnstorableValue,
    json_response,
    too_many_requests,
)
from qp.logs import ARRIVED, CLIENT_HASH, method_name, route_name
from qp.metrics import CLIENT_LEFT, METRICS
from qp.policy.policy import POLICY
from qp.protection.client_address import IP_SALT, client_address, hash_client
from qp.protection.rate_limits import RATE_CLASSES, RATE_LIMITER

log = logging.getLogger("qp.middlewares")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths no route has (404, 405) are limited like the chats routes, so probing costs too.
UNROUTED_RATE_CLASS = "chats"


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Observe, limit, answer failures with JSON: see the module's docstring."""
    request[ARRIVED] = started = time.monotonic()
    status = CLIENT_LEFT
    try:
        try:
            app = request.app
            policy = app[POLICY].current
            client = hash_client(client_address(request, policy.trusted), app[IP_SALT])
            request[CLIENT_HASH] = client
            rate_class = app[RATE_CLASSES].get(request.match_info.route)
            if rate_class is None and request.match_info.http_exception is not None:
                rate_class = UNROUTED_RATE_CLASS
            if rate_class is not None:
                limiter, limit = app[RATE_LIMITER], policy.rate_limit(rate_class)
                # A class whose limits are off still refuses blocked clients; no need to count.
                if limit.is_limited:
                    refusal = await limiter.check(client, rate_class, limit)
                else:
                    refusal = limiter.blocked(client)
                if refusal is not None:
                    app[METRICS].rate_limit_refusals.labels(rate_class, refusal.reason).inc()
                    limiter.refusals_per_hour.add()
                    raise too_many_requests(refusal.retry_after, refusal.message)
            response = await handler(request)
        except Exception as err:
            response = error_answer(request, err)
        status = response.status
        return response
    finally:
        count, duration = request.app[METRICS].request_series(
            route_name(request), method_name(request), status
        )
        count.inc()
        duration.observe(time.monotonic() - started)


def error_answer(request: web.BaseRequest, err: Exception) -> web.Response:
    """The JSON answer to a failure; nothing ever leaves as a traceback or HTML. Called
    while `err` is being handled (an unexpected one is logged with its traceback)."""
    if isinstance(err, ApiError):
        response = json_response(err.body, err.status, err.headers)
        if err.close:
            response.force_close()  # the rest of the body is not worth waiting for
        return response
    if isinstance(err, StorageUnavailable):
        return storage_unavailable(request, err)
    if isinstance(err, UnstorableValue):
        # A value the checks at the door let through and the database refused: the
        # request's fault, not an outage (the message names the error, not the value).
        log.warning("%s %s: %s", method_name(request), route_name(request), err)
        return json_response({"error": _invalid_data(route_name(request))}, 400)
    if isinstance(err, web.HTTPNotFound):
        return json_response({"error": NOT_FOUND}, 404)
    if isinstance(err, web.HTTPMethodNotAllowed):
        return json_response(
            {"error": "Method not allowed"}, 405, {"Allow": ", ".join(sorted(err.allowed_methods))}
        )
    if isinstance(err, web.HTTPException):
        if err.status < 400:
            raise err
        return json_response({"error": err.reason}, err.status)
    log.exception("unhandled error in %s %s", method_name(request), route_name(request))
    return json_response({"error": "Internal server error"}, 500)


def storage_unavailable(request: web.BaseRequest, err: StorageUnavailable) -> web.Response:
    """The 503 of a failed database or blob store, logged: one answer whichever part
    failed, since the client can only wait and retry."""
    log.error("%s %s: %s", method_name(request), route_name(request), err)
    return json_response(STORAGE_UNAVAILABLE, 503, {"Retry-After": "5"})


# The contract's 400 for data a route's store refused, by route; others: BAD_REQUEST.
_INVALID_DATA = {
    "/api/chats": "Invalid chat data",
    "/api/chats/{chat_id}": "Invalid chat data",
    "/api/completion": "Invalid completion request",
}


def _invalid_data(route: str) -> str:
    return _INVALID_DATA.get(route, BAD_REQUEST)


MIDDLEWARES = [front]
