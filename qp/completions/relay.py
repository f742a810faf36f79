"""The completion relay: POST upstream, then pass each chunk to the client as it arrives.

Nothing is buffered beyond the chunk in hand: every chunk read from OpenRouter is written
to the client before the next read, unchanged. The handler runs with aiohttp's handler
cancellation on, so a client that leaves cancels it at whatever it awaits, and leaving the
upstream response's context closes that connection at once: nobody pays for tokens no one
reads. The record says how it ended, whatever happens: the caller hands it to spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from qp.completions.attempts import Payload, first_answer
from qp.completions.usage import UsageScanner
from qp.logs import RELAY_OVERHEAD
from qp.policy.policy import Policy
from qp.spend.record import CompletionRecord

log = logging.getLogger("qp.completions.relay")

STREAM_HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    # Not answered from the response cache (qp/completions/flights.py).
    "X-QP-Cache": "miss",
}
# Connections to upstream held at once: one per open stream.
MAX_UPSTREAM_CONNECTIONS = 4096


@dataclass(frozen=True)
class Upstream:
    """Where completions go: the one client session for the life of the process, and the
    event set when the server starts shutting down (streams cut after it are `shutdown`)."""

    session: aiohttp.ClientSession
    shutting_down: asyncio.Event


def open_upstream_session() -> aiohttp.ClientSession:
    """The one client session for the life of the process, reusing connections to upstream."""
    connector = aiohttp.TCPConnector(limit=MAX_UPSTREAM_CONNECTIONS, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(),
        # Cookies upstream sets for one user's request must never ride along on another's.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def relay_completion(
    request: web.Request,
    upstream: Upstream,
    policy: Policy,
    payload: Payload,
    record: CompletionRecord,
) -> web.StreamResponse:
    """Stream the upstream completion to the client; errors before the stream are ApiErrors.
    However it ends, `record` says how.

    A stream still open when the server's shutdown timeout ends is cut: `shutting_down`
    tells that apart from a client that left.
    """
    with recording_the_end(record, upstream):
        answer, own = await first_answer(request, upstream.session, policy, payload, record)
        async with answer:
            return await _stream(request, answer, record, own)


@contextlib.contextmanager
def recording_the_end(record: CompletionRecord, upstream: Upstream) -> Iterator[None]:
    """Around a completion's upstream request and stream: its duration, and how it ended
    when it is cancelled (a shutdown's timeout, else the client left)."""
    started = time.monotonic()
    try:
        yield
    except asyncio.CancelledError:
        if upstream.shutting_down.is_set():
            record.outcome = "shutdown"
        else:
            record.client_left = True
            if record.outcome == "pending":
                record.outcome = "client_left"
        raise
    finally:
        record.duration_ms = round((time.monotonic() - started) * 1000)


async def read_chunk(upstream: aiohttp.ClientResponse, record: CompletionRecord) -> bytes | None:
    """Upstream's next chunk (b"" at its end); None when it went silent past the idle
    timeout or failed mid-stream (the record says which)."""
    try:
        return await upstream.content.readany()
    except TimeoutError:
        record.outcome = "upstream_idle"
        log.warning("completion: upstream silent mid-stream; stream ended")
    except aiohttp.ClientError as err:
        record.outcome = "upstream_died"
        log.warning("completion: upstream failed mid-stream (%s)", type(err).__name__)
    return None


async def _stream(
    request: web.Request, upstream: aiohttp.ClientResponse, record: CompletionRecord, own: float
) -> web.StreamResponse:
    """Relay the chunks. Once the first is written, the request's RELAY_OVERHEAD is `own`
    (the time before the upstream request) plus the server's time between upstream's
    answer and its first chunk reaching the client (upstream's wait for it left out)."""
    answered = time.monotonic()
    response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    try:
        await response.prepare(request)
    except ConnectionError:
        # The client left as upstream began to answer, which upstream may bill.
        record.outcome, record.client_left = "client_left", True
        raise
    record.status = 200
    usage = UsageScanner()
    own += time.monotonic() - answered
    first = True
    try:
        while True:
            chunk = await read_chunk(upstream, record)
            if chunk is None:
                abort_stream(request)
                break
            read = time.monotonic() if first else 0.0
            try:
                if not chunk:
                    await response.write_eof()
                    record.outcome = "completed"
                    break
                await response.write(chunk)
            except ConnectionError:
                record.outcome, record.client_left = "client_left", True
                break
            if first:
                first = False
                request[RELAY_OVERHEAD] = own + time.monotonic() - read
            usage.feed(chunk)
    finally:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cost = usage.cost
        record.generation_id = usage.generation_id
    return response


def abort_stream(request: web.Request) -> None:
    """End the client's stream without its final chunk, so it can tell it was cut short."""
    if request.transport is not None:
        request.transport.close()


UPSTREAM = web.AppKey("upstream", Upstream)
