"""The chats table: every statement about chats' rows, plain and parameterised.

A chat write changes the row (with `pending` describing the write) before the blob, and
clears `pending` after it. Finishing or undoing a write is conditional on the row still
carrying that write's note and `updated_at`: whoever resolves a write (the writer itself
after a failed blob, a start-up, `check --repair` beside a live server) can never clobber
a write that came after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from qp.chats.model import ChatExists, ChatInput, ChatLimitExceeded, ChatRow
from qp.storage.database import Statements, Transaction, Unchanged
from qp.timestamps import later_than

# The chats table's columns, in ChatRow's order (all but `pending`).
COLUMNS = (
    "chat_id, app, model, prompt_tokens, completion_tokens, estimated_cost, created_at,"
    " updated_at, messages_bytes"
)
SELECT = f"SELECT {COLUMNS} FROM chats"

ONE = SELECT + " WHERE chat_id = ?"
# PostgreSQL only (the only database several processes write to): `= ANY` of an array.
VERSIONS = "SELECT chat_id, updated_at FROM chats WHERE chat_id = ANY(?)"
NEWEST_OF_APP = SELECT + " WHERE app = ? ORDER BY updated_at DESC LIMIT ?"
COUNT_OF_APP = "SELECT COUNT(*) FROM chats WHERE app = ?"
EXISTS = "SELECT 1 FROM chats WHERE chat_id = ?"
INSERT = f"INSERT INTO chats ({COLUMNS}, pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
UPDATE = """
    UPDATE chats SET model = ?, prompt_tokens = ?, completion_tokens = ?, estimated_cost = ?,
                     updated_at = ?, messages_bytes = ?, pending = ?
    WHERE chat_id = ?
"""
FINISH = "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ? AND updated_at = ?"
UNDO_CREATE = "DELETE FROM chats WHERE chat_id = ? AND pending = ? AND updated_at = ?"
UNDO_UPDATE = UPDATE + " AND pending = ? AND updated_at = ?"
SETTLE = "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ?"
PENDING = f"SELECT {COLUMNS}, pending FROM chats WHERE pending IS NOT NULL"
DELETE = "DELETE FROM chats WHERE chat_id = ? RETURNING messages_bytes"
DELETE_SETTLED = "DELETE FROM chats WHERE chat_id = ? AND pending IS NULL AND updated_at = ?"
IMPORTED = "SELECT updated_at, pending FROM chats WHERE chat_id = ?"
IMPORT = f"""
    INSERT INTO chats ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (chat_id) DO UPDATE SET
        app = excluded.app, model = excluded.model, prompt_tokens = excluded.prompt_tokens,
        completion_tokens = excluded.completion_tokens, estimated_cost = excluded.estimated_cost,
        created_at = excluded.created_at, updated_at = excluded.updated_at,
        messages_bytes = excluded.messages_bytes, pending = NULL
"""
STORED_BYTES = """
    SELECT COALESCE(SUM(messages_bytes), 0), COUNT(*) - COUNT(messages_bytes) FROM chats
"""
OF_UNKNOWN_SIZE = "SELECT chat_id FROM chats WHERE messages_bytes IS NULL LIMIT ?"
NOTE_SIZE = "UPDATE chats SET messages_bytes = ? WHERE chat_id = ? AND messages_bytes IS NULL"
ALL_IDS = "SELECT chat_id, updated_at FROM chats"
# The apps with the most chats (at most `?` of them), by name.
# A page of rows by chat id (copying a database).
PAGE_AFTER = SELECT + " WHERE chat_id > ? ORDER BY chat_id LIMIT ?"
APPS = """
    SELECT app, chats, updated_at FROM (
        SELECT app, COUNT(*) AS chats, MAX(updated_at) AS updated_at FROM chats
        GROUP BY app ORDER BY chats DESC, app LIMIT ?
    ) AS most ORDER BY app
"""


def changed(chat_id: str) -> str:
    """The topic other processes hear when a chat's row changes (they drop their copy)."""
    return f"chat:{chat_id}"


class ChatRows:
    """The chats table of one database (or of the session holding a chat's lock)."""

    def __init__(self, db: Statements):
        self.db = db

    async def one(self, chat_id: str) -> ChatRow | None:
        row = await self.db.fetchone(ONE, (chat_id,))
        return ChatRow(*row) if row else None

    async def newest(self, app: str, limit: int) -> list[ChatRow]:
        """The app's chats, newest `updated_at` first."""
        return [ChatRow(*row) for row in await self.db.fetchall(NEWEST_OF_APP, (app, limit))]

    async def insert(
        self, chat_id: str, chat: ChatInput, now: str, max_chats_per_app: int, pending: str
    ) -> None:
        """Insert a new row; the app's count check and the insert are one transaction. Call
        with the chat's lock held (ChatStore), as `update` and `delete`."""

        async def insert(tx: Transaction) -> None:
            await tx.lock(f"chats-of-app:{chat.app}")
            ((count,),) = await tx.fetchall(COUNT_OF_APP, (chat.app,))
            if count >= max_chats_per_app:
                raise ChatLimitExceeded
            if await tx.fetchall(EXISTS, (chat_id,)):
                raise ChatExists
            await tx.execute(
                INSERT,
                (
                    chat_id,
                    chat.app,
                    chat.model,
                    chat.prompt_tokens,
                    chat.completion_tokens,
                    chat.estimated_cost,
                    now,
                    now,
                    len(chat.messages_json),
                    pending,
                ),
            )
            await tx.notify(changed(chat_id))

        await self.db.write(insert)

    async def versions(self, chat_ids: list[str]) -> dict[str, str]:
        """Chat id -> updated_at (each write of a chat leaves one of its own) of those of
        the chats that have a row (PostgreSQL only)."""
        return {row[0]: row[1] for row in await self.db.fetchall(VERSIONS, (chat_ids,))}

    async def update(
        self, chat_id: str, chat: ChatInput, now: str, pending: Callable[[ChatRow, str], str]
    ) -> ChatRow | None:
        """Replace model, usage and updated_at (`now`, or just after the row's if that is not
        later), recording `pending(row as it was, updated_at)`; answers the row as it was,
        or None if there is none."""

        async def update(tx: Transaction) -> ChatRow | None:
            rows = await tx.fetchall(ONE, (chat_id,))
            if not rows:
                return None
            previous = ChatRow(*rows[0])
            values = (chat.model, chat.prompt_tokens, chat.completion_tokens, chat.estimated_cost)
            size = len(chat.messages_json)
            updated_at = later_than(now, previous.updated_at or "")
            note = pending(previous, updated_at)
            await tx.execute(UPDATE, (*values, updated_at, size, note, chat_id))
            await tx.notify(changed(chat_id))
            return previous

        return await self.db.write(update)

    async def finish_write(self, chat_id: str, pending: str, updated_at: str) -> bool:
        """The write's blob is stored: clear its note."""
        cleared = await self.db.execute_write(
            FINISH, (chat_id, pending, updated_at), maintenance=True
        )
        return cleared > 0

    async def undo_create(self, chat_id: str, pending: str, updated_at: str) -> bool:
        """A create whose blob was not stored: remove its row."""
        return await self._undo(chat_id, UNDO_CREATE, (chat_id, pending, updated_at))

    async def _undo(self, chat_id: str, sql: str, params: tuple[object, ...]) -> bool:
        async def undo(tx: Transaction) -> bool:
            if await tx.execute(sql, params) == 0:
                return False
            await tx.notify(changed(chat_id))
            return True

        return await self.db.write(undo, maintenance=True)

    async def undo_update(self, previous: ChatRow, pending: str, updated_at: str) -> bool:
        """An update whose blob was not stored: put the row back exactly as it was."""
        values = (
            previous.model,
            previous.prompt_tokens,
            previous.completion_tokens,
            previous.estimated_cost,
            previous.updated_at,
            previous.messages_bytes,
            None,
            previous.chat_id,
        )
        return await self._undo(previous.chat_id, UNDO_UPDATE, (*values, pending, updated_at))

    async def settle(self, writes: list[tuple[str, str]]) -> None:
        """Mark (chat id, pending) writes as done; a later write's note is left alone."""
        if writes:
            await self.db.execute_write_many(SETTLE, writes, maintenance=True)

    async def pending(self) -> list[tuple[ChatRow, str]]:
        """Rows whose last write may not have reached the blob store, with its note."""
        return [(ChatRow(*row[:-1]), row[-1]) for row in await self.db.fetchall(PENDING)]

    async def delete(self, chat_id: str) -> int:
        """Remove the row; answers the size of the messages it said were stored. Deletes
        are how an operator makes room on a full disk: they may use the disk reserve."""

        async def delete(tx: Transaction) -> int:
            rows = await tx.fetchall(DELETE, (chat_id,))
            await tx.notify(changed(chat_id))
            return (rows[0][0] or 0) if rows else 0

        return await self.db.write(delete, maintenance=True)

    async def delete_settled(
        self, chat_id: str, updated_at: str, and_then: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Delete a row no write is pending on and unchanged since it was read (same
        `updated_at`), with `and_then` (checking and deleting its blob) run inside the same
        transaction, which commits only if it answers True. No write of that chat, from any
        process, can start until both are done."""

        async def delete(tx: Transaction) -> bool:
            await tx.lock(f"chat:{chat_id}")
            if await tx.execute(DELETE_SETTLED, (chat_id, updated_at)) == 0 or not await and_then():
                raise Unchanged
            return True

        try:
            return await self.db.write(delete, maintenance=True)
        except Unchanged:
            return False

    async def without_row(self, chat_id: str, and_then: Callable[[], Awaitable[bool]]) -> bool:
        """Run `and_then` (deleting an orphan blob) only while the chat has no row, inside a
        write transaction: no create, from any process, can insert its row meanwhile."""

        async def check(tx: Transaction) -> bool:
            await tx.lock(f"chat:{chat_id}")
            if await tx.fetchall(EXISTS, (chat_id,)):
                return False
            return await and_then()

        return await self.db.write(check, maintenance=True)

    async def import_rows(self, rows: list[ChatRow]) -> tuple[int, int, int]:
        """Store imported rows in one transaction: new ones added, stored ones replaced only
        by a newer one. Answers (added, replaced, unchanged)."""

        async def store(tx: Transaction) -> tuple[int, int, int]:
            added = replaced = 0
            for row in rows:
                found = await tx.fetchall(IMPORTED, (row.chat_id,))
                # A row a server is writing right now (pending) is the server's to finish.
                if found and (found[0][0] >= row.updated_at or found[0][1] is not None):
                    continue
                await tx.execute(IMPORT, dataclasses.astuple(row))
                added, replaced = (added, replaced + 1) if found else (added + 1, replaced)
            return added, replaced, len(rows) - added - replaced

        return await self.db.write(store)

    async def stored_bytes(self) -> tuple[int, int]:
        """Bytes of messages the rows say are stored, and how many rows do not say."""
        total, unknown = await self.db.fetchone(STORED_BYTES) or (0, 0)
        return int(total), int(unknown)

    async def of_unknown_size(self, limit: int) -> list[str]:
        return [row[0] for row in await self.db.fetchall(OF_UNKNOWN_SIZE, (limit,))]

    async def note_sizes(self, sizes: list[tuple[int, str]]) -> None:
        """Record (size, chat id) of messages found in the blob store (rows imported)."""
        await self.db.execute_write_many(NOTE_SIZE, sizes)

    async def page_after(self, chat_id: str, limit: int) -> list[ChatRow]:
        """Up to `limit` rows whose chat id sorts after `chat_id`, in that order."""
        return [ChatRow(*row) for row in await self.db.fetchall(PAGE_AFTER, (chat_id, limit))]

    async def apps(self, limit: int) -> list[tuple[str, int, str]]:
        """(app, chats, latest updated_at) of the `limit` apps with the most chats, by name."""
        return [(row[0], row[1], row[2]) for row in await self.db.fetchall(APPS, (limit,))]

    async def all_ids(self) -> list[tuple[str, str]]:
        """(chat id, updated_at) of every row."""
        return [(row[0], row[1]) for row in await self.db.fetchall(ALL_IDS)]
