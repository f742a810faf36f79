"""Logging on stderr: one line per request, naming the route pattern, never paths or bodies."""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access logger would log raw paths, which carry chat ids (bearer secrets).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for chatty in ("botocore", "aiobotocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def route_name(request: web.BaseRequest) -> str:
    """The route's pattern, never the path itself: chat ids in paths are bearer secrets."""
    match_info = getattr(request, "match_info", None)
    if match_info is None or match_info.http_exception is not None:
        return "(no route)"
    return match_info.route.resource.canonical if match_info.route.resource else "(no route)"


class AccessLogger(AbstractAccessLogger):
    """method, route pattern, status, duration, bytes sent."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %.1fms %dB",
            request.method,
            route_name(request),
            response.status,
            time * 1000,
            response.body_length,
        )
