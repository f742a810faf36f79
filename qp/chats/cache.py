"""ChatCache: rendered chats kept in memory, least recently used first out past its bound in bytes.

Each entry keeps the version (revision) of the row it was rendered from. Every write
through this server drops the chat's entry once its row is committed; a read that began
before such a drop (it took its `ticket` earlier) cannot put what it read, which may be
the version just replaced. Changes made by another process clear the chat's entry when
announced (or the whole cache, see `Peers.changed_elsewhere`), and a server sharing its
database with others serves an entry only while the row still names its version
(ChatStore).
"""

from __future__ import annotations

from collections import OrderedDict

# Drops remembered for reads in flight; a read older than the oldest one remembered is
# not cached (only under a storm of writes).
REMEMBERED_DROPS = 4096


class ChatCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # One entry may take at most this much, so a few huge chats cannot flush the rest.
        self.max_entry_bytes = max_bytes // 16
        # chat id -> (rendered chat, version of the row it was rendered from)
        self._entries: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        # Counts drops; chat id -> the count at its latest drop (the newest last).
        self._drops = 0
        self._dropped_at: OrderedDict[str, int] = OrderedDict()
        self._remembered_since = 0

    def get(self, chat_id: str) -> tuple[bytes, str] | None:
        """The rendered chat and the version it was rendered from."""
        entry = self._entries.get(chat_id)
        if entry is not None:
            self._entries.move_to_end(chat_id)
        return entry

    def ticket(self) -> int:
        """Taken by a read before it reads the row: what `put` checks drops against."""
        return self._drops

    def put(self, chat_id: str, rendered: bytes, version: str, ticket: int) -> None:
        """Keep a rendered chat, unless it was dropped after the read's `ticket` was taken."""
        if len(rendered) > self.max_entry_bytes or ticket < self._remembered_since:
            return
        if self._dropped_at.get(chat_id, -1) > ticket:
            return
        self._remove(chat_id)
        self._entries[chat_id] = (rendered, version)
        self._bytes += len(rendered)
        while self._bytes > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def discard(self, chat_id: str) -> None:
        """The chat changed: drop its entry, and refuse what reads begun before bring."""
        self._drops += 1
        self._remove(chat_id)
        self._dropped_at[chat_id] = self._drops
        self._dropped_at.move_to_end(chat_id)
        while len(self._dropped_at) > REMEMBERED_DROPS:
            _, self._remembered_since = self._dropped_at.popitem(last=False)

    def clear(self) -> None:
        self._drops += 1
        self._entries.clear()
        self._bytes = 0
        self._dropped_at.clear()
        self._remembered_since = self._drops

    def _remove(self, chat_id: str) -> None:
        entry = self._entries.pop(chat_id, None)
        if entry is not None:
            self._bytes -= len(entry[0])
