"""CurrentVersions: the version (revision) of chats as the database has it now, for checking
cached chats on a database other processes write to. The checks asked for in one turn of
the event loop go to the database as one query, so many concurrent cached reads cost one
round trip, not one each."""

from __future__ import annotations

import asyncio

from qp.chats.sql import ChatRows


class CurrentVersions:
    def __init__(self, rows: ChatRows):
        self._rows = rows
        self._waiting: dict[str, list[asyncio.Future[str | None]]] = {}
        self._asking: set[asyncio.Task[None]] = set()

    async def of(self, chat_id: str) -> str | None:
        """The chat's version now, or None when it has no row."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._ask)
        self._waiting.setdefault(chat_id, []).append(answer)
        return await answer

    def _ask(self) -> None:
        waiting, self._waiting = self._waiting, {}
        task = asyncio.ensure_future(self._answer(waiting))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _answer(self, waiting: dict[str, list[asyncio.Future[str | None]]]) -> None:
        try:
            versions = await self._rows.versions(list(waiting))
        except Exception as err:  # each asker gets the error (StorageUnavailable: a 503)
            for answers in waiting.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(err)
            return
        for chat_id, answers in waiting.items():
            for answer in answers:
                if not answer.done():
                    answer.set_result(versions.get(chat_id))
