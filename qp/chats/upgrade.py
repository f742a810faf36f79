"""The writes a version before schema 7 left unfinished, resolved once by its own rule.

Those versions overwrote `chats/{chatId}.json` in place and left a `pending` note on the
row (the operation, the SHA-256 of the messages written, the row as it was) until the blob
was stored. A row still carrying one is finished when the blob holds those messages and
undone otherwise (a create's row removed, an update's row put back); each change is
conditional on the note, so processes starting together never both apply one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import orjson

from qp.chats.model import ChatRow, blob_key
from qp.chats.sql import ADD_GARBAGE, COLUMNS, changed
from qp.storage.blobs import BlobStore
from qp.storage.database import Statements, Transaction

log = logging.getLogger("qp.chats.upgrade")

PENDING = f"SELECT {COLUMNS}, pending FROM chats WHERE pending IS NOT NULL"
FINISH = "UPDATE chats SET pending = NULL WHERE chat_id = ? AND pending = ?"
UNDO_CREATE = "DELETE FROM chats WHERE chat_id = ? AND pending = ?"
UNDO_UPDATE = """
    UPDATE chats SET model = ?, prompt_tokens = ?, completion_tokens = ?, estimated_cost = ?,
                     updated_at = ?, messages_bytes = ?, pending = NULL
    WHERE chat_id = ? AND pending = ?
"""


async def has_old_writes(db: Statements) -> bool:
    return bool(await db.fetchall(PENDING + " LIMIT 1"))


async def resolve_old_writes(db: Statements, blobs: BlobStore) -> tuple[int, int]:
    """Finish or undo every write an older version left pending; (finished, undone).
    StorageUnavailable when the blob store or the database does not answer."""
    finished = undone = 0
    for *columns, note in await db.fetchall(PENDING):
        row = ChatRow(*columns)
        intent = _read(note)
        stored = await blobs.get(blob_key(row.chat_id, None))
        digest = hashlib.sha256(stored).hexdigest() if stored is not None else None
        if intent is None:
            log.error("a chat row's old pending note cannot be read; the row is kept as is")
            await db.execute_write(FINISH, (row.chat_id, note))
        elif digest == intent["sha256"]:
            await db.execute_write(FINISH, (row.chat_id, note))
            finished += 1
        elif await _undo(db, row, note, intent):
            undone += 1
    if finished or undone:
        log.warning(
            "resolved %d chat writes an older version left: %d finished, %d undone",
            finished + undone,
            finished,
            undone,
        )
    return finished, undone


async def _undo(db: Statements, row: ChatRow, note: str, intent: dict[str, Any]) -> bool:
    """Put the row back as it was before the write (a create's: none)."""

    async def undo(tx: Transaction) -> bool:
        return await _undo_in(tx, row, note, intent)

    return await db.write(undo)


async def _undo_in(tx: Transaction, row: ChatRow, note: str, intent: dict[str, Any]) -> bool:
    previous = intent.get("previous")
    if intent.get("op") == "create" or not isinstance(previous, dict):
        changed_rows = await tx.execute(UNDO_CREATE, (row.chat_id, note))
        # Whatever the worker's key holds is not this chat's any more.
        await tx.execute(ADD_GARBAGE, (row.chat_id, "", time.time()))
    else:
        values = [
            previous.get(name)
            for name in (
                "model",
                "prompt_tokens",
                "completion_tokens",
                "estimated_cost",
                "updated_at",
                "messages_bytes",
            )
        ]
        changed_rows = await tx.execute(UNDO_UPDATE, (*values, row.chat_id, note))
    await tx.notify(changed(row.chat_id))
    return changed_rows > 0


# What an update's note must say of the row as it was, to put it back.
_PREVIOUS = {
    "model": (str,),
    "prompt_tokens": (int, float),
    "completion_tokens": (int, float),
    "estimated_cost": (int, float),
    "updated_at": (str,),
    "messages_bytes": (int, type(None)),
}


def _read(note: str) -> dict[str, Any] | None:
    """The note's intent, or None for one that is not a whole note of the old writer's
    (that row is then kept as it is, its note cleared: nothing to go back to)."""
    try:
        intent = orjson.loads(note)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(intent, dict) or not isinstance(intent.get("sha256"), str):
        return None
    if intent.get("op") == "create":
        return intent
    previous = intent.get("previous")
    if intent.get("op") != "update" or not isinstance(previous, dict):
        return None
    for name, types in _PREVIOUS.items():
        value = previous.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            return None
    return intent
