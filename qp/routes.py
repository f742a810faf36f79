"""The route table: every route of the API, on one screen."""

from __future__ import annotations

from aiohttp import web

from qp.admin import handlers as admin
from qp.admin import page as admin_page
from qp.chats import handlers as chat_handlers
from qp.completions import handlers as completion_handlers
from qp.openapi import document as openapi
from qp.ops import health as ops
from qp.spend import handlers as spend_handlers

# method, path, handler, rate-limit class (None: not limited; the admin routes)
ROUTES = (
    ("POST", "/api/chats", chat_handlers.create_chat, "chats"),
    ("GET", "/api/chats", chat_handlers.list_chats, None),
    ("GET", "/api/chats/{chat_id}", chat_handlers.get_chat, "chats"),
    ("PUT", "/api/chats/{chat_id}", chat_handlers.update_chat, "chats"),
    ("DELETE", "/api/chats/{chat_id}", chat_handlers.delete_chat, None),
    ("POST", "/api/completion", completion_handlers.create_completion, "completion"),
    ("GET", "/api/usage", spend_handlers.usage_report, None),
    ("GET", "/api/openapi.json", openapi.openapi_document, None),
    # The operator's page and what it reads (admin key required for the JSON).
    ("GET", "/admin", admin_page.admin_page, None),
    ("GET", "/admin/", admin_page.admin_page, None),
    ("GET", "/admin/static/{name}", admin_page.admin_static, None),
    ("GET", "/api/admin/overview", admin.overview, None),
    ("GET", "/api/admin/spend", admin.spend, None),
    ("GET", "/api/admin/apps", admin.apps, None),
    ("GET", "/api/admin/policies", admin.policies, None),
    ("GET", "/api/admin/blocks", admin.blocks, None),
    ("DELETE", "/api/admin/blocks/{client}", admin.lift_block, None),
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
