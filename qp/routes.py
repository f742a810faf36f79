"""The route table: every route of the API, on one screen."""

from __future__ import annotations

from aiohttp import web

from qp import chat_handlers, completion_handlers


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/api/chats", chat_handlers.create_chat)
    router.add_get("/api/chats", chat_handlers.list_chats)
    router.add_get("/api/chats/{chat_id}", chat_handlers.get_chat)
    router.add_put("/api/chats/{chat_id}", chat_handlers.update_chat)
    router.add_delete("/api/chats/{chat_id}", chat_handlers.delete_chat)
    router.add_post("/api/completion", completion_handlers.create_completion)
    router.add_get("/api/usage", completion_handlers.usage_report)
