"""Reading request bodies under a size limit, and parsing them as JSON."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from qp.errors import ApiError, too_large


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or a 413 once it is known to exceed `limit` bytes.

    aiohttp's own `client_max_size` would answer its own 413 body; the contract's body and
    the chat-sized limit are decided here instead.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large("Request body", declared, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large("Request body", size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int) -> Any:
    """The body parsed as JSON: 413 when too large, 400 `Invalid JSON body` when not JSON."""
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "Invalid JSON body") from None
