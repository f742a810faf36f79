"""ChatCache: rendered chats kept in memory, least recently used first out past a byte budget.

Every write through this server drops the chat's entry while it holds the chat's write lock,
and entries are only added under the read lock, so a cached chat is never older than what
is stored. Changes made by another process (the operators' tools) clear the whole cache
when the database notices them (see `Database.changed_elsewhere`). Each entry keeps the
`updated_at` of the row it was rendered from, so a server sharing its database with others
can check that it is still the one stored (see ChatStore.open_chat).
"""

from __future__ import annotations

from collections import OrderedDict


class ChatCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # One entry may take at most this much, so a few huge chats cannot flush the rest.
        self.max_entry_bytes = max_bytes // 16
        # chat id -> (rendered chat, updated_at of the row it was rendered from)
        self._entries: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0

    def get(self, chat_id: str) -> bytes | None:
        entry = self.get_versioned(chat_id)
        return entry[0] if entry is not None else None

    def get_versioned(self, chat_id: str) -> tuple[bytes, str] | None:
        """The rendered chat and the `updated_at` it was rendered at."""
        entry = self._entries.get(chat_id)
        if entry is not None:
            self._entries.move_to_end(chat_id)
        return entry

    def put(self, chat_id: str, rendered: bytes, version: str = "") -> None:
        if len(rendered) > self.max_entry_bytes:
            return
        self.discard(chat_id)
        self._entries[chat_id] = (rendered, version)
        self._bytes += len(rendered)
        while self._bytes > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def discard(self, chat_id: str) -> None:
        entry = self._entries.pop(chat_id, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
