"""The errors qp raises and the contract's answers for them: ApiError (a status and the exact
JSON body), the storage failures, the contract's 413, 429 and 507, and JSON responses. The
middleware's `error_answer` (qp/middlewares.py) turns each into its answer."""

from __future__ import annotations

import errno
from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    """An answer other than success: a status and the exact JSON body the contract names.
    `close`: the connection is closed after it (the rest of the body is not worth reading)."""

    def __init__(
        self,
        status: int,
        error: str,
        headers: dict[str, str] | None = None,
        *,
        close: bool = False,
        **extra: Any,
    ):
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, **extra}
        self.headers = headers or {}
        self.close = close


class ConfigError(Exception):
    """A configuration value is unusable; the message is one line naming it."""


# Why storage failed, as /healthz names it: out of space, refusing writes, or anything else.
FULL = "full"
READ_ONLY = "read-only"
UNAVAILABLE = "unavailable"


def os_error_reason(err: OSError) -> str:
    """FULL, READ_ONLY or UNAVAILABLE for an error from the operating system."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FULL
    if err.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
        return READ_ONLY
    return UNAVAILABLE


class StorageUnavailable(Exception):
    """The database or the blob store failed or cannot be reached; answered 503.

    `what` names the part (Database, Storage); `reason` is FULL, READ_ONLY or UNAVAILABLE.
    """

    def __init__(self, what: str, detail: str = "", reason: str = UNAVAILABLE):
        super().__init__(f"{what}: {detail}" if detail else what)
        self.what = what
        self.reason = reason


class UnstorableValue(Exception):
    """The database cannot hold a value it was given (a NUL, text that is not UTF-8, a
    number out of its column's range): a data error, never an outage. A request meeting one
    is answered 400; a background write drops only the item that holds it.

    The message names the error's kind (and SQLSTATE), never the value: it may be a chat id.
    """

    def __init__(self, what: str, err: BaseException):
        code = getattr(err, "sqlstate", None)
        kind = f"{type(err).__name__} ({code})" if code else type(err).__name__
        super().__init__(f"{what} refused a value: {kind}")
        self.what = what


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def json_bytes_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A response whose JSON is already serialised (chats spliced from stored bytes). The
    Content-Type goes in as a header: aiohttp parses a `content_type` argument on every
    response (a measurable part of a cached GET)."""
    return web.Response(body=body, status=status, headers={**JSON_CONTENT_TYPE, **(headers or {})})


JSON_CONTENT_TYPE = {"Content-Type": "application/json"}


def format_size(n: int) -> str:
    """The contract's size rendering: `N B`, `N.N KB`, `N.N MB`."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def too_large(what: str, size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "Request validation failed",
        message=f"{what} too large: {format_size(size)} (max: {format_size(limit)})",
    )


NOT_FOUND = "Not found"
# A request the HTTP parser (or aiohttp's body decoding) could not read.
BAD_REQUEST = "Bad request"
STORAGE_UNAVAILABLE = {"error": "Storage unavailable"}


def too_many_requests(retry_after: int, message: str) -> ApiError:
    """The contract's 429: `Retry-After`, and `retryAfter` and the reason in the body."""
    return ApiError(
        429,
        "Rate limit exceeded",
        headers={"Retry-After": str(retry_after)},
        retryAfter=retry_after,
        message=message,
    )


def insufficient_storage() -> ApiError:
    """Free disk below the operator's floor, or all chats' messages at the total cap: new
    chats and updates wait; deletes still work."""
    return ApiError(507, "Insufficient storage")
