"""The operator's page: GET /admin and its static files, served from the package.

Nothing on the page is secret (it asks for the admin key and sends it only to the admin
JSON routes), so it is served to anyone; a strict Content-Security-Policy keeps anything
but its own script from running on it, and `no-cache` with an ETag (the content's hash)
makes a browser check for a newer version each time without fetching an unchanged one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from qp.errors import ApiError

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


@functools.cache
def static_files() -> dict[str, StaticFile]:
    """The page's files by name, read once."""
    files = {}
    for path in sorted(STATIC.iterdir()):
        if path.suffix in CONTENT_TYPES:
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            files[path.name] = StaticFile(body, CONTENT_TYPES[path.suffix], etag)
    return files


async def admin_page(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def admin_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name == "index.html" or name not in static_files():
        raise ApiError(404, "Not found")
    return _serve(request, name)


def _serve(request: web.Request, name: str) -> web.Response:
    found = static_files()[name]
    headers = {**PAGE_HEADERS, "ETag": found.etag}
    if found.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})
