"""ChatCache: rendered chats kept in memory, least recently used first out past a byte budget.

Every write through this server drops the chat's entry while it holds the chat's write lock,
and entries are only added under the read lock, so a cached chat is never older than what
is stored. Changes made by another process (the operators' tools) clear the whole cache
when the database notices them (see `Database.changed_elsewhere`).
"""

from __future__ import annotations

from collections import OrderedDict


class ChatCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # One entry may take at most this much, so a few huge chats cannot flush the rest.
        self.max_entry_bytes = max_bytes // 16
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, chat_id: str) -> bytes | None:
        rendered = self._entries.get(chat_id)
        if rendered is not None:
            self._entries.move_to_end(chat_id)
        return rendered

    def put(self, chat_id: str, rendered: bytes) -> None:
        if len(rendered) > self.max_entry_bytes:
            return
        self.discard(chat_id)
        self._entries[chat_id] = rendered
        self._bytes += len(rendered)
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def discard(self, chat_id: str) -> None:
        rendered = self._entries.pop(chat_id, None)
        if rendered is not None:
            self._bytes -= len(rendered)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
