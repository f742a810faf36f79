"""Reading bodies under a size limit (a request's, with deadlines; an upstream answer's),
and parsing them as JSON."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import StreamReader, web

from qp.errors import BAD_REQUEST, ApiError, too_large
from qp.policy.policy import Policy

# Parsed into Python objects, JSON takes up to this many times its size (`[{},{},...]`:
# a 64-byte dict for every 3 bytes). A body is charged that much of the in-flight bytes until
# it is parsed.
PARSE_FACTOR = 25


async def read_at_most(stream: StreamReader, limit: int) -> bytes:
    """The body up to its end, or its first `limit` bytes if it is longer. (The stream's
    own `read(n)` answers with what has arrived so far, which for a body of many packets is
    only its beginning.)"""
    pieces: list[bytes] = []
    size = 0
    while size < limit and (piece := await stream.read(limit - size)):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def body_allowance(request: web.Request, limit: int) -> int:
    """What reading and parsing this body may cost at most: the declared length (or the
    limit, for a body of unknown length) times PARSE_FACTOR."""
    declared = request.content_length
    return PARSE_FACTOR * min(declared if declared is not None else limit, limit)


async def read_body(request: web.Request, limit: int, policy: Policy) -> bytes:
    """The whole body, or a 413 once it is known to exceed `limit` bytes; 408 when the
    client goes quiet for `body_idle_timeout` or takes over `body_timeout` in all.

    aiohttp's own `client_max_size` would answer its own 413 body; the contract's body and
    the chat-sized limit are decided here instead.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large("Request body", declared, limit)
    content = request.content
    if content.is_eof() and content.exception() is None:
        # The whole body came with the headers (most do): nothing to wait for, no timer.
        body = content.read_nowait()
        if len(body) > limit:
            raise too_large("Request body", len(body), limit)
        return body
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + policy.body_timeout
    while True:
        quiet = min(policy.body_idle_timeout, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(quiet, 0)):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _too_slow() from None
        except web.RequestPayloadError:
            # A body aiohttp could not decode (its Content-Encoding, its chunks): what the
            # HTTP parser answers for a request it cannot read.
            raise ApiError(400, BAD_REQUEST, close=True) from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise too_large("Request body", size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_slow() -> ApiError:
    return ApiError(408, "Request timeout", close=True, message="The request body came too slowly")


async def read_json(request: web.Request, limit: int, policy: Policy) -> Any:
    """The body parsed as JSON: 413 when too large, 400 `Invalid JSON body` when not JSON."""
    body = await read_body(request, limit, policy)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "Invalid JSON body") from None
