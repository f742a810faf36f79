"""The route table: every route of the API, on one screen."""

from __future__ import annotations

from aiohttp import web

from qp.chats import handlers as chat_handlers
from qp.completions import handlers as completion_handlers
from qp.ops import health as ops
from qp.ops import openapi

# method, path, handler, rate-limit class (None: not limited; the admin routes)
ROUTES = (
    ("POST", "/api/chats", chat_handlers.create_chat, "chats"),
    ("GET", "/api/chats", chat_handlers.list_chats, None),
    ("GET", "/api/chats/{chat_id}", chat_handlers.get_chat, "chats"),
    ("PUT", "/api/chats/{chat_id}", chat_handlers.update_chat, "chats"),
    ("DELETE", "/api/chats/{chat_id}", chat_handlers.delete_chat, None),
    ("POST", "/api/completion", completion_handlers.create_completion, "completion"),
    ("GET", "/api/usage", completion_handlers.usage_report, None),
    ("GET", "/api/openapi.json", openapi.openapi_document, None),
    # For operators and monitoring; nginx passes only /api/ on.
    ("GET", "/healthz", ops.healthz, None),
    ("GET", "/metrics", ops.metrics, None),
)


def add_routes(router: web.UrlDispatcher) -> dict[web.AbstractRoute, str]:
    """Register the table; answers each limited route's rate-limit class."""
    rate_classes = {}
    for method, path, handler, rate_class in ROUTES:
        route = router.add_route(method, path, handler)
        if rate_class is not None:
            rate_classes[route] = rate_class
    return rate_classes
