"""Getting upstream's answer: the request POSTed, and tried again after a failure before
the first byte (no connection, 429, 5xx), up to `upstream_retries` times after a jittered
backoff or upstream's Retry-After, then on the app's fallback models in order (not for a
client's own key: its model only), all within `upstream_timeout`. A model whose breaker is
open (qp/completions/breakers.py) is skipped.

Nothing an attempt that failed may have cost is lost, because none that upstream may bill
is ever followed by another: upstream bills no error answer and no request that never
reached it, and the timeout ends the tries (the one it cut is costed at the estimate, as
before). Once upstream answers 2xx nothing is tried again: the stream is the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import http
import logging
import random
import re
import time

import aiohttp
import orjson
from aiohttp import web

from qp.completions.breakers import BREAKERS, ModelBreakers
from qp.errors import ApiError
from qp.logs import ARRIVED
from qp.metrics import METRICS
from qp.policy.policy import Policy
from qp.spend.record import CompletionRecord

log = logging.getLogger("qp.completions.attempts")

CONNECT_TIMEOUT = 10.0
# How much of an upstream error body is read to find its message.
MAX_ERROR_BODY = 64 * 1024


class Payload:
    """The body to POST upstream but its model (a JSON object, `{...}`), and the OpenRouter
    key that pays for it. Kept only until upstream answers: nothing holds it for the
    stream's life."""

    def __init__(self, rest: bytes, key: str):
        self._rest = rest
        self.key = key

    def body(self, model: str) -> bytes:
        """The whole body, asking for `model`."""
        return b'{"model":' + orjson.dumps(model) + b"," + self._rest[1:]

    def release(self) -> None:
        self._rest = b""


async def first_answer(
    request: web.Request,
    session: aiohttp.ClientSession,
    policy: Policy,
    payload: Payload,
    record: CompletionRecord,
) -> tuple[aiohttp.ClientResponse, float]:
    """Upstream's 2xx answer, and the server's own time before the first request; else the
    ApiError of the last failure (the record says which, the model that answered, and the
    attempts)."""
    breakers = request.app[BREAKERS]
    metrics = request.app[METRICS]
    attempts = metrics.attempt_results
    paid_by_us = record.payer != "user"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.upstream_timeout
    now = time.monotonic()
    own = now - request.get(ARRIVED, now)
    failure: ApiError | None = None
    try:
        for model in policy.models_to_try(record.model, record.app, paid_by_us):
            for attempt in range(policy.upstream_retries + 1):
                if failure is not None and loop.time() >= deadline:
                    raise failure  # no time left for another request: the last failure
                if paid_by_us and not breakers.allows(model, policy):
                    metrics.breaker_skips.inc()
                    failure = failure or _breaker_open(breakers, model, record)
                    break
                record.attempts += 1
                record.status, record.outcome = 0, "pending"
                try:
                    answer = await _post(session, policy, payload, model, deadline)
                except aiohttp.ClientError as err:
                    attempts["unreachable"].inc()
                    record.status, record.outcome = 502, "unreachable"
                    log.warning("completion: cannot reach upstream: %s", type(err).__name__)
                    failure = ApiError(
                        502, "Bad Gateway", message="Could not connect to the completion service"
                    )
                    wait = _backoff(attempt)
                else:
                    attempts[_result(answer.status)].inc()
                    if 200 <= answer.status < 300:
                        if paid_by_us:
                            breakers.succeeded(model)
                        record.answered_model = model
                        if model != record.model:
                            metrics.fallback_answers.inc()
                        return answer, own
                    async with answer:
                        failure = await _upstream_error(answer, record, deadline)
                        if answer.status not in RETRIED_STATUSES:
                            raise failure
                        wait = max(_backoff(attempt), _retry_after(answer) or 0.0)
                if paid_by_us:
                    breakers.failed(model, policy)
                if attempt == policy.upstream_retries or loop.time() + wait >= deadline:
                    break
                await asyncio.sleep(wait)
    except TimeoutError:
        attempts["timeout"].inc()
        record.status, record.outcome = 504, "timeout"
        log.warning("completion: no answer from upstream within %g s", policy.upstream_timeout)
        if paid_by_us:
            breakers.failed(model, policy)
        raise ApiError(
            504,
            "Gateway Timeout",
            message=f"The completion service did not answer within {policy.upstream_timeout:g} s",
        ) from None
    finally:
        payload.release()
    assert failure is not None  # every model was tried or skipped
    raise failure


# Upstream's statuses that say "not now" rather than "not this request": tried again.
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 520, 522, 524, 529})
# The first backoff; each next one doubles, each drawn from its upper half.
BACKOFF_SECONDS = 0.2


def _result(status: int) -> str:
    """An answer's label in qp_upstream_attempts: answered, 429, 5xx or refused."""
    if 200 <= status < 300:
        return "answered"
    if status == 429:
        return "429"
    return "5xx" if status in RETRIED_STATUSES else "refused"


def _backoff(attempt: int) -> float:
    return BACKOFF_SECONDS * 2.0**attempt * random.uniform(0.5, 1.0)


def _retry_after(answer: aiohttp.ClientResponse) -> float | None:
    """Upstream's Retry-After in seconds (a number or an HTTP date), if it sent one."""
    value = answer.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if _SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(value)
        return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)
    return None


MAX_RETRY_AFTER = 3600.0
# Retry-After in seconds as HTTP writes it (float() would take "1_0", "nan", "1e9").
_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")


def _breaker_open(breakers: ModelBreakers, model: str, record: CompletionRecord) -> ApiError:
    record.status, record.outcome = 503, "breaker_open"
    retry_after = breakers.retry_after(model)
    return ApiError(
        503,
        "Service Unavailable",
        headers={"Retry-After": str(retry_after)},
        message=f"The completion service keeps failing for model {model}; it is tried again"
        f" in {retry_after} s",
    )


async def _post(
    session: aiohttp.ClientSession,
    policy: Policy,
    payload: Payload,
    model: str,
    deadline: float,
) -> aiohttp.ClientResponse:
    async with asyncio.timeout_at(deadline):
        return await session.post(
            policy.openrouter_url_parsed,
            data=payload.body(model),
            headers={
                "Authorization": f"Bearer {payload.key}",
                "Content-Type": "application/json",
                # Compression would make upstream and us hold bytes back.
                "Accept-Encoding": "identity",
            },
            allow_redirects=False,
            timeout=_client_timeout(policy.upstream_idle_timeout),
        )


@functools.cache
def _client_timeout(idle: float) -> aiohttp.ClientTimeout:
    """The upstream request's socket deadlines: one object per policy's idle timeout, not
    one per request (a policy changes on SIGHUP only)."""
    return aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=idle)


async def _upstream_error(
    upstream: aiohttp.ClientResponse, record: CompletionRecord, deadline: float
) -> ApiError:
    """The same status, the upstream's reason phrase, and its own message when it has one;
    a redirect or a status HTTP does not define is 502."""
    record.outcome = "upstream_error"
    log.warning("completion: upstream answered %d", upstream.status)
    if not 400 <= upstream.status <= 599:
        record.status = 502
        return ApiError(
            502,
            "Bad Gateway",
            message=f"The completion service answered with status {upstream.status}",
        )
    record.status = upstream.status
    reason = upstream.reason or _phrase(upstream.status)
    try:
        # Within the tries' deadline: an error body that never ends holds nothing up.
        async with asyncio.timeout_at(deadline):
            body = await upstream.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    message = _error_message(body)
    if message is None:
        return ApiError(upstream.status, reason)
    return ApiError(upstream.status, reason, message=message)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Upstream error"


def _error_message(body: bytes) -> str | None:
    """OpenRouter's `{"error": {"message": ...}}`, or a plain `error`/`message` string."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for candidate in (error, parsed.get("message")):
        if isinstance(candidate, str):
            return candidate
    return None
