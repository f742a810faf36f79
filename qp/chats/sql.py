"""The chats' tables: every statement about chats' rows, plain and parameterised.

A write stores its messages under a revision of its own, and its row's commit is the one
moment it takes effect:
- `begin_write` records the write's intent (a `chat_writes` row) before its blob is put;
- `commit_create` / `commit_update` consume that intent and commit the row naming the
  revision in one transaction, or change nothing;
- the revision a commit superseded (or a delete removed) goes to `chat_garbage`, whose
  blobs no row names any more.
The garbage collector (garbage.py) deletes an intent before it deletes its blob, and a
commit succeeds only while its intent is there, so the two exclude each other.

The total of all chats' messages is `chat_bytes` (the schema's triggers add each row
change to it in that change's transaction). With a total storage cap, a commit that grows
the total takes the cap's lock before its row changes and reads the total after: over the
cap, it changes nothing. Those commits queue for the lock, every process's alike; the
others (and all of them without a cap) never wait for it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Container

from qp.chats.model import (
    ChatChanged,
    ChatExists,
    ChatInput,
    ChatLimitExceeded,
    ChatNotFound,
    ChatRow,
    StorageCapReached,
    WriteAbandoned,
)
from qp.storage.database import Statements, Transaction
from qp.timestamps import later_than

# The chats table's columns, in ChatRow's order.
COLUMNS = (
    "chat_id, app, model, prompt_tokens, completion_tokens, estimated_cost, created_at,"
    " updated_at, messages_bytes, blob_rev"
)
SELECT = f"SELECT {COLUMNS} FROM chats"

ONE = SELECT + " WHERE chat_id = ?"
# PostgreSQL only (the only database several processes write to): `= ANY` of an array.
VERSIONS = "SELECT chat_id, blob_rev, updated_at FROM chats WHERE chat_id = ANY(?)"
NEWEST_OF_APP = SELECT + " WHERE app = ? ORDER BY updated_at DESC LIMIT ?"
COUNT_OF_APP = "SELECT COUNT(*) FROM chats WHERE app = ?"
BEFORE_CREATE = """
    SELECT (SELECT COUNT(*) FROM chats WHERE app = ?),
           (SELECT COUNT(*) FROM chats WHERE chat_id = ?),
           (SELECT COALESCE(SUM(bytes), 0) FROM chat_bytes)
"""
BEGIN_WRITE = "INSERT INTO chat_writes (rev, chat_id, started_at) VALUES (?, ?, ?)"
END_WRITE = "DELETE FROM chat_writes WHERE rev = ?"
INSERT = f"""
    INSERT INTO chats ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (chat_id) DO NOTHING
"""
# Conditional on the revision (and size) read just before, so two commits of one chat
# never both take the same row for the one they supersede (PostgreSQL re-reads it after a
# wait), and the size a commit replaces is the one it counted on.
UPDATE = """
    UPDATE chats SET model = ?, prompt_tokens = ?, completion_tokens = ?, estimated_cost = ?,
                     updated_at = ?, messages_bytes = ?, blob_rev = ?
    WHERE chat_id = ? AND COALESCE(blob_rev, '') = ? AND COALESCE(messages_bytes, -1) = ?
"""
ADD_GARBAGE = """
    INSERT INTO chat_garbage (chat_id, rev, since) VALUES (?, ?, ?)
    ON CONFLICT (chat_id, rev) DO NOTHING
"""
# A blob found that no row names: garbage only while no row names it and no write that
# may still commit it is in flight (that write's intent was recorded before its blob).
ADD_UNNAMED = """
    INSERT INTO chat_garbage (chat_id, rev, since)
    SELECT CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS DOUBLE PRECISION)
    WHERE NOT EXISTS (SELECT 1 FROM chats WHERE chat_id = ? AND COALESCE(blob_rev, '') = ?)
      AND NOT EXISTS (SELECT 1 FROM chat_writes WHERE rev = ?)
    ON CONFLICT (chat_id, rev) DO NOTHING
"""
DELETE = "DELETE FROM chats WHERE chat_id = ? RETURNING blob_rev"
# Removing a row that cannot be served, only while it still names the blob found broken.
DELETE_BROKEN = "DELETE FROM chats WHERE chat_id = ? AND COALESCE(blob_rev, '') = ?"
EXPIRED_WRITES = "SELECT rev, chat_id FROM chat_writes WHERE started_at < ? LIMIT ?"
# A garbage blob the rows name again (the worker's key, by an import) is not deleted.
GARBAGE = """
    SELECT chat_id, rev FROM chat_garbage AS g
    WHERE NOT EXISTS (
        SELECT 1 FROM chats AS c WHERE c.chat_id = g.chat_id AND COALESCE(c.blob_rev, '') = g.rev
    )
    ORDER BY since LIMIT ?
"""
FORGET_GARBAGE = "DELETE FROM chat_garbage WHERE chat_id = ? AND rev = ?"
WRITES_IN_FLIGHT = "SELECT chat_id, rev FROM chat_writes"
ALL_GARBAGE = "SELECT chat_id, rev FROM chat_garbage"
# Every blob the tables know of, in one statement and so one snapshot: a blob moves from
# intent to row to garbage, each step one commit, and two reads could miss it between them.
ALL_KNOWN = """
    SELECT chat_id, rev FROM chat_writes
    UNION ALL SELECT chat_id, rev FROM chat_garbage
    UNION ALL SELECT chat_id, COALESCE(blob_rev, '') FROM chats
"""
IMPORTED = "SELECT updated_at, blob_rev FROM chats WHERE chat_id = ?"
# An imported row names the worker's key, whose blob the import's copy brings.
IMPORT = f"""
    INSERT INTO chats ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)
    ON CONFLICT (chat_id) DO UPDATE SET
        app = excluded.app, model = excluded.model, prompt_tokens = excluded.prompt_tokens,
        completion_tokens = excluded.completion_tokens, estimated_cost = excluded.estimated_cost,
        created_at = excluded.created_at, updated_at = excluded.updated_at,
        messages_bytes = excluded.messages_bytes, blob_rev = NULL
"""
# A copy between databases keeps each row's revision (newer updated_at wins).
COPY = f"""
    INSERT INTO chats ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (chat_id) DO UPDATE SET
        app = excluded.app, model = excluded.model, prompt_tokens = excluded.prompt_tokens,
        completion_tokens = excluded.completion_tokens, estimated_cost = excluded.estimated_cost,
        created_at = excluded.created_at, updated_at = excluded.updated_at,
        messages_bytes = excluded.messages_bytes, blob_rev = excluded.blob_rev
    WHERE excluded.updated_at > chats.updated_at
"""
STORED_BYTES = "SELECT COALESCE(SUM(bytes), 0) FROM chat_bytes"
# The total as counted and as the rows hold it, in one statement: of the same moment.
COUNTED_AND_HELD = """
    SELECT (SELECT COALESCE(SUM(bytes), 0) FROM chat_bytes),
           (SELECT COALESCE(SUM(messages_bytes), 0) FROM chats)
"""
# Counting again (UNCOUNT, then COUNT_AGAIN, in one transaction): every shard is written
# first, so a commit meanwhile either committed before (and is in the sum) or waits for
# this one (and adds to the count after it).
UNCOUNT = "UPDATE chat_bytes SET bytes = 0"
COUNT_AGAIN = """
    UPDATE chat_bytes SET bytes = (SELECT COALESCE(SUM(messages_bytes), 0) FROM chats)
    WHERE shard = 0
"""
UNKNOWN_SIZES = "SELECT COUNT(*) - COUNT(messages_bytes) FROM chats"
OF_UNKNOWN_SIZE = "SELECT chat_id FROM chats WHERE messages_bytes IS NULL LIMIT ?"
NOTE_SIZE = "UPDATE chats SET messages_bytes = ? WHERE chat_id = ? AND messages_bytes IS NULL"
ALL_NAMED = "SELECT chat_id, blob_rev, updated_at FROM chats"
# A page of rows by chat id (copying a database).
PAGE_AFTER = SELECT + " WHERE chat_id > ? ORDER BY chat_id LIMIT ?"
# The apps with the most chats (at most `?` of them), by name.
APPS = """
    SELECT app, chats, updated_at FROM (
        SELECT app, COUNT(*) AS chats, MAX(updated_at) AS updated_at FROM chats
        GROUP BY app ORDER BY chats DESC, app LIMIT ?
    ) AS most ORDER BY app
"""


# Held by each commit that grows the total while a total storage cap is set.
CAP_LOCK = "chat-bytes"


def changed(chat_id: str) -> str:
    """The topic other processes hear when a chat's row changes (they drop their copy)."""
    return f"chat:{chat_id}"


class ChatRows:
    """The chats' tables of one database."""

    def __init__(self, db: Statements):
        self.db = db

    async def one(self, chat_id: str) -> ChatRow | None:
        row = await self.db.fetchone(ONE, (chat_id,))
        return ChatRow(*row) if row else None

    async def newest(self, app: str, limit: int) -> list[ChatRow]:
        """The app's chats, newest `updated_at` first."""
        return [ChatRow(*row) for row in await self.db.fetchall(NEWEST_OF_APP, (app, limit))]

    async def before_create(self, chat_id: str, app: str) -> tuple[int, bool, int]:
        """(the app's chats, whether `chat_id` is taken, the bytes stored): a create's checks
        before its blob."""
        ((count, taken, stored),) = await self.db.fetchall(BEFORE_CREATE, (app, chat_id))
        return int(count), bool(taken), int(stored)

    async def begin_write(self, chat_id: str, rev: str, started_at: float) -> None:
        """Record a write's intent before its blob is put. Its commit need not wait for the
        disk: an intent a database crash forgets only leaves a blob `check` finds."""

        await self.db.execute_write(BEGIN_WRITE, (rev, chat_id, started_at), durable=False)

    async def commit_create(
        self,
        chat_id: str,
        chat: ChatInput,
        rev: str,
        now: str,
        max_chats_per_app: int,
        max_total_bytes: int = 0,
    ) -> None:
        """Insert the row naming `rev`: the app's count check, the total's (0: no cap;
        StorageCapReached) and the insert are one transaction, which also consumes the
        write's intent (WriteAbandoned without it)."""

        async def insert(tx: Transaction) -> None:
            if await tx.execute(END_WRITE, (rev,)) == 0:
                raise WriteAbandoned
            await tx.lock(f"chats-of-app:{chat.app}")
            ((count,),) = await tx.fetchall(COUNT_OF_APP, (chat.app,))
            if count >= max_chats_per_app:
                raise ChatLimitExceeded
            if max_total_bytes:
                await tx.lock(CAP_LOCK)
            values = (chat.model, chat.prompt_tokens, chat.completion_tokens, chat.estimated_cost)
            size = len(chat.messages_json)
            if not await tx.execute(INSERT, (chat_id, chat.app, *values, now, now, size, rev)):
                raise ChatExists
            if max_total_bytes:
                await _refuse_past(tx, max_total_bytes)
            await tx.notify(changed(chat_id))

        await self.db.write(insert)

    async def commit_update(
        self,
        chat_id: str,
        chat: ChatInput,
        rev: str,
        now: str,
        superseded_at: float,
        if_match: Container[str] | None,
        max_total_bytes: int = 0,
    ) -> ChatRow:
        """Make the row name `rev` (model, usage, updated_at too), consuming the write's
        intent, and put the revision it names now in the garbage; answers the row as it
        was. ChatNotFound, ChatChanged (not a revision of `if_match`), WriteAbandoned,
        StorageCapReached (it would grow the total past `max_total_bytes`; 0: no cap)."""

        async def update(tx: Transaction) -> ChatRow:
            if await tx.execute(END_WRITE, (rev,)) == 0:
                raise WriteAbandoned
            values = (chat.model, chat.prompt_tokens, chat.completion_tokens, chat.estimated_cost)
            size = len(chat.messages_json)
            while True:
                rows = await tx.fetchall(ONE, (chat_id,))
                if not rows:
                    raise ChatNotFound
                previous = ChatRow(*rows[0])
                if if_match is not None and previous.version not in if_match:
                    raise ChatChanged
                grows = max_total_bytes > 0 and size > (previous.messages_bytes or 0)
                if grows:
                    await tx.lock(CAP_LOCK)
                updated_at = later_than(now, previous.updated_at or "")
                old = previous.blob_rev or ""
                was = -1 if previous.messages_bytes is None else previous.messages_bytes
                params = (*values, updated_at, size, rev, chat_id, old, was)
                if await tx.execute(UPDATE, params):
                    break
            if grows:
                await _refuse_past(tx, max_total_bytes)
            await tx.execute(ADD_GARBAGE, (chat_id, old, superseded_at))
            await tx.notify(changed(chat_id))
            return previous

        return await self.db.write(update)

    async def abandon_write(self, chat_id: str, rev: str, at: float) -> bool:
        """A write that will not commit and whose blob is known to be stored (its commit
        was refused): its intent becomes garbage. False when the intent is gone already."""

        async def abandon(tx: Transaction) -> bool:
            if await tx.execute(END_WRITE, (rev,)) == 0:
                return False
            await tx.execute(ADD_GARBAGE, (chat_id, rev, at))
            return True

        return await self.db.write(abandon, durable=False)

    async def delete(self, chat_id: str, at: float) -> str | None:
        """Remove the row, its revision put in the garbage; answers that revision, or None
        when there was no row. Deletes are how an operator makes room on a full disk: they
        may use the disk reserve."""

        async def delete(tx: Transaction) -> str | None:
            rows = await tx.fetchall(DELETE, (chat_id,))
            if not rows:
                return None
            rev = rows[0][0] or ""
            await tx.execute(ADD_GARBAGE, (chat_id, rev, at))
            await tx.notify(changed(chat_id))
            return rev

        return await self.db.write(delete, maintenance=True)

    async def delete_broken(self, chat_id: str, rev: str) -> bool:
        """Remove a row that cannot be served, only while it still names revision `rev`."""

        async def delete(tx: Transaction) -> bool:
            if await tx.execute(DELETE_BROKEN, (chat_id, rev)) == 0:
                return False
            await tx.notify(changed(chat_id))
            return True

        return await self.db.write(delete, maintenance=True)

    async def versions(self, chat_ids: list[str]) -> dict[str, str]:
        """Chat id -> its version now (ChatRow.version) of those of the chats that have a
        row (PostgreSQL only)."""
        return {
            chat_id: rev or updated_at
            for chat_id, rev, updated_at in await self.db.fetchall(VERSIONS, (chat_ids,))
        }

    async def expire_writes(self, started_before: float, at: float, limit: int) -> int:
        """Give up on writes begun before `started_before` that never committed: each
        intent is deleted and its revision put in the garbage, in one transaction (a
        commit can no longer consume it). Answers how many."""

        # Read first: most sweeps find none, and then take no write transaction.
        if not await self.db.fetchall(EXPIRED_WRITES, (started_before, 1)):
            return 0

        async def expire(tx: Transaction) -> int:
            expired = 0
            for rev, chat_id in await tx.fetchall(EXPIRED_WRITES, (started_before, limit)):
                if await tx.execute(END_WRITE, (rev,)):
                    await tx.execute(ADD_GARBAGE, (chat_id, rev, at))
                    expired += 1
            return expired

        return await self.db.write(expire, maintenance=True)

    async def garbage(self, limit: int) -> list[tuple[str, str]]:
        """(chat id, rev) of blobs no row names any more, oldest first."""
        return [(row[0], row[1]) for row in await self.db.fetchall(GARBAGE, (limit,))]

    async def forget_garbage(self, collected: list[tuple[str, str]]) -> None:
        """Blobs deleted: their garbage rows go (a crash before this deletes them again)."""
        if collected:
            await self.db.execute_write_many(
                FORGET_GARBAGE, collected, maintenance=True, durable=False
            )

    async def add_garbage(self, blobs: list[tuple[str, str]], at: float) -> None:
        """Blobs no row names any more (a database copied), to be collected."""
        if blobs:
            await self.db.execute_write_many(
                ADD_GARBAGE, [(chat_id, rev, at) for chat_id, rev in blobs], maintenance=True
            )

    async def add_unnamed(self, blobs: list[tuple[str, str]], at: float) -> None:
        """Blobs `check` found that no row names, to be collected, each only while no row
        names it and no write in flight may commit it."""
        if blobs:
            params = [(c, r, at, c, r, r) for c, r in blobs]
            await self.db.execute_write_many(ADD_UNNAMED, params, maintenance=True)

    async def known_unnamed(self) -> set[tuple[str, str]]:
        """(chat id, rev) of the blobs the tables know no row names yet: writes in flight
        and garbage."""
        rows = await self.db.fetchall(WRITES_IN_FLIGHT) + await self.db.fetchall(ALL_GARBAGE)
        return {(row[0], row[1]) for row in rows}

    async def known_blobs(self) -> set[tuple[str, str]]:
        """(chat id, rev; "" for the worker's key) of every blob the tables know of, as one
        moment had them: writes in flight, the revisions rows name, garbage."""
        return {(row[0], row[1]) for row in await self.db.fetchall(ALL_KNOWN)}

    async def import_rows(self, rows: list[ChatRow]) -> tuple[int, int, int]:
        """Store imported rows (naming the worker's key) in one transaction: new ones
        added, stored ones replaced only by a newer one, whose revision goes to the
        garbage. Answers (added, replaced, unchanged)."""

        async def store(tx: Transaction) -> tuple[int, int, int]:
            added = replaced = 0
            for row in rows:
                found = await tx.fetchall(IMPORTED, (row.chat_id,))
                if found and found[0][0] >= row.updated_at:
                    continue
                await tx.execute(IMPORT, dataclasses.astuple(row)[:-1])
                # The worker's key is named again: it is no longer garbage.
                await tx.execute(FORGET_GARBAGE, (row.chat_id, ""))
                if found and found[0][1]:
                    await tx.execute(ADD_GARBAGE, (row.chat_id, found[0][1], time.time()))
                added, replaced = (added, replaced + 1) if found else (added + 1, replaced)
            return added, replaced, len(rows) - added - replaced

        return await self.db.write(store)

    async def copy_rows(self, rows: list[ChatRow]) -> None:
        """Upsert rows copied from another database, revisions and all (the newer wins)."""
        await self.db.execute_write_many(COPY, [dataclasses.astuple(row) for row in rows])

    async def stored_bytes(self) -> int:
        """Bytes of messages stored, all chats together (as counted)."""
        ((total,),) = await self.db.fetchall(STORED_BYTES)
        return int(total)

    async def counted_and_held(self) -> tuple[int, int]:
        """The bytes of messages stored as counted, and as the rows say (`check`)."""
        ((counted, held),) = await self.db.fetchall(COUNTED_AND_HELD)
        return int(counted), int(held)

    async def count_again(self) -> None:
        """Set the count of bytes stored to what the rows say (`check --repair`)."""

        async def count(tx: Transaction) -> None:
            await tx.execute(UNCOUNT)
            await tx.execute(COUNT_AGAIN)

        await self.db.write(count, maintenance=True)

    async def unknown_sizes(self) -> int:
        """How many rows do not know the size of their messages (imported ones)."""
        ((unknown,),) = await self.db.fetchall(UNKNOWN_SIZES)
        return int(unknown)

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

    async def all_named(self) -> dict[str, tuple[str, str]]:
        """Chat id -> (the revision its row names, "" for the worker's key; updated_at)."""
        return {row[0]: (row[1] or "", row[2]) for row in await self.db.fetchall(ALL_NAMED)}


async def _refuse_past(tx: Transaction, max_total_bytes: int) -> None:
    """A commit holding CAP_LOCK, its row changed: StorageCapReached if the total it made
    is over the cap (which undoes the change)."""
    ((total,),) = await tx.fetchall(STORED_BYTES)
    if total > max_total_bytes:
        raise StorageCapReached
