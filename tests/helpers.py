"""Small HTTP helpers shared by the tests."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


async def call(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    """Status and parsed JSON body (every answer of this API is JSON)."""
    async with http.request(method, path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


async def create(http: aiohttp.ClientSession, chat: dict) -> str:
    status, body = await call(http, "POST", "/api/chats", json={"chat": chat})
    assert status == 200, body
    return body["chatId"]
