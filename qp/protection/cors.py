"""CORS through aiohttp-cors, with origin patterns.

aiohttp-cors looks origins up in a mapping; `AllowedOrigins` is that mapping, answering for
exact origins and for patterns (`*` one DNS label, `**` one or more), and always from the
policy in force, so a reload changes it for the next request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import aiohttp_cors
from aiohttp import hdrs, web
from aiohttp_cors.urldispatcher_router_adapter import ResourcesUrlDispatcherRouterAdapter

ALLOW_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
ALLOW_HEADERS = ("Content-Type", "x-openrouter-key", "x-admin-key")
MAX_AGE = 86400

_OPTIONS = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
    allow_credentials=False,
    allow_headers=ALLOW_HEADERS,
    allow_methods=ALLOW_METHODS,
    max_age=MAX_AGE,
)
_LABEL = "[A-Za-z0-9-]+"


class OriginMatcher:
    """Exact origins and patterns: in a pattern `*` is one DNS label, `**` one or more."""

    def __init__(self, origins: tuple[str, ...]):
        self.origins = origins
        self._exact = frozenset(o for o in origins if "*" not in o)
        self._patterns = [_compile(o) for o in origins if "*" in o]

    def allows(self, origin: str) -> bool:
        return origin in self._exact or any(p.fullmatch(origin) for p in self._patterns)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        rf"{_LABEL}(?:\.{_LABEL})*" if part == "**" else _LABEL if part == "*" else re.escape(part)
        for part in parts
    )
    return re.compile(regex)


class AllowedOrigins(Mapping[str, aiohttp_cors.ResourceOptions]):
    """The origin -> options mapping aiohttp-cors consults, backed by the current matcher."""

    def __init__(self, matcher: Callable[[], OriginMatcher]):
        self._matcher = matcher

    def __getitem__(self, origin: str) -> aiohttp_cors.ResourceOptions:
        if self._matcher().allows(origin):
            return _OPTIONS
        raise KeyError(origin)

    def __iter__(self) -> Iterator[str]:
        return iter(self._matcher().origins)

    def __len__(self) -> int:
        return len(self._matcher().origins)


def setup_cors(app: web.Application, matcher: Callable[[], OriginMatcher]) -> None:
    """Enable CORS on every route registered so far."""
    adapter = ResourcesUrlDispatcherRouterAdapter(app.router, AllowedOrigins(matcher))
    cors = aiohttp_cors.CorsConfig(app, router_adapter=adapter)
    for route in list(app.router.routes()):
        cors.add(route)

    async def contract_headers(request: web.Request, response: web.StreamResponse) -> None:
        """What aiohttp-cors leaves to us: Vary on Origin always; the allowed origin on
        answers for paths no route matched (aiohttp-cors only sees routes); and, on an
        allowed preflight, every method and header the API takes."""
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        allowed = response.headers.get(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN)
        origin = request.headers.get(hdrs.ORIGIN)
        if allowed is None and origin and request.match_info.http_exception is not None:
            if matcher().allows(origin):
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        elif allowed is not None and request.method == hdrs.METH_OPTIONS:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ", ".join(ALLOW_METHODS)
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(ALLOW_HEADERS)

    app.on_response_prepare.append(contract_headers)
