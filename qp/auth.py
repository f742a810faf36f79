"""The admin check shared by every admin route."""

from __future__ import annotations

import hmac

from aiohttp import web

from qp.errors import ApiError


def require_admin(request: web.Request, admin_key: str | None) -> None:
    """401 unless `x-admin-key` equals the configured key (constant time); none configured: 401."""
    given = request.headers.get("x-admin-key")
    if not admin_key or given is None:
        raise ApiError(401, "Unauthorized")
    if not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), admin_key.encode("utf-8", "surrogateescape")
    ):
        raise ApiError(401, "Unauthorized")
