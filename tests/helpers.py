"""Small HTTP helpers shared by the tests."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from tests.support import make_chat

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


def chat_version(chat_id: str, n: int, app: str = "load") -> dict:
    """Version n of a chat: model, messages and usage all say n, so a torn chat shows."""
    return make_chat(
        chat_id,
        app=app,
        model=f"v{n}",
        messages=[{"role": "user", "content": f"{chat_id} version {n}"}],
        usage=(n, n, n / 1000),
    )


class WriteLoad:
    """Clients creating and updating chats at once until stopped, remembering every write
    the server acknowledged, so that each can be read back afterwards."""

    def __init__(self, url: str, workers: int = 8, prefix: str = "load"):
        self.url = url
        self.workers = workers
        self.prefix = prefix
        self.acknowledged: dict[str, int] = {}
        self.refused: list[tuple[str, int, Any]] = []  # (method, status, body) not 200
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WriteLoad:
        self._http = aiohttp.ClientSession(self.url)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 60)
        finally:
            await self._http.close()

    async def _worker(self, number: int) -> None:
        mine: list[str] = []
        n = 0
        while not self._stop.is_set():
            n += 1
            if not mine or n % 3 == 0:
                chat_id = f"{self.prefix}-{number}-{n}"
                version, method, path = 0, "POST", "/api/chats"
            else:
                chat_id = mine[n % len(mine)]
                version = self.acknowledged[chat_id] + 1
                method, path = "PUT", f"/api/chats/{chat_id}"
            chat = chat_version(chat_id, version, self.prefix)
            status, body = await call(self._http, method, path, json={"chat": chat})
            if status != 200:
                self.refused.append((method, status, body))
                continue
            if method == "POST":
                mine.append(chat_id)
            self.acknowledged[chat_id] = version

    async def check_all_read_back(self, http: aiohttp.ClientSession) -> None:
        """Every acknowledged chat answers with the last version acknowledged, whole."""
        assert len(self.acknowledged) > 10, "the load did not get going"
        for chat_id, version in sorted(self.acknowledged.items()):
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            assert status == 200, f"{chat_id}: acknowledged v{version}, now {status} {chat}"
            expected = chat_version(chat_id, version, self.prefix)
            assert (chat["model"], chat["messages"], chat["totalUsage"]) == (
                expected["model"],
                expected["messages"],
                expected["totalUsage"],
            ), f"{chat_id}: acknowledged v{version}, now {chat['model']}"
