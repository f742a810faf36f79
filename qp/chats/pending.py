"""A chat write in flight: the `pending` note it leaves on the row until its blob is
stored, and what finishing or undoing it takes."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from qp.chats.model import ChatRow
from qp.storage.blobs import BlobStore, chat_key
from qp.timestamps import epoch_seconds

log = logging.getLogger("qp.chats.pending")


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A chat write between its SQL step and its blob: what finishing or undoing it takes."""

    chat_id: str
    note: str  # the row's `pending` while the write is unfinished
    op: str  # create or update
    sha256: str  # of the messages the write stores
    at: float  # epoch seconds of its SQL step
    updated_at: str  # the row's updated_at as the write left it
    previous: ChatRow | None  # an update's row as it was
    owner: str = ""  # the write lease of the process making it ("" in notes from before)

    @classmethod
    def read(cls, row: ChatRow, note: str) -> PendingWrite | None:
        """The write a row's note describes; None (logged) for a note that is not one of
        ours, which is left for the operator rather than guessed at."""
        try:
            intent = orjson.loads(note)
            previous = intent.get("previous")
            write = cls(
                chat_id=row.chat_id,
                note=note,
                op=intent["op"],
                sha256=intent["sha256"],
                # Notes written before `at` existed: the row's own time is the SQL step's.
                at=float(intent.get("at", epoch_seconds(row.updated_at))),
                updated_at=row.updated_at,
                previous=ChatRow(**previous) if previous else None,
                owner=str(intent.get("owner", "")),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            log.error("a chat row's pending note cannot be read; `check` lists it")
            return None
        if write.op not in ("create", "update"):
            log.error("a chat row's pending note cannot be read; `check` lists it")
            return None
        return write


def messages_digest(messages_json: bytes) -> str:
    """SHA-256 of a messages array as stored: how a pending write knows its blob."""
    return hashlib.sha256(messages_json).hexdigest()


async def blob_matches(blobs: BlobStore, chat_id: str, digest: str) -> bool:
    """Whether the chat's blob holds the messages with this SHA-256 (a pending write's)."""
    stored = await blobs.get(chat_key(chat_id))
    return stored is not None and messages_digest(stored) == digest


def make_note(
    op: str, messages_json: bytes, owner: str, previous: ChatRow | None = None
) -> tuple[str, str, float]:
    """The `pending` note a write leaves on its row until its blob is stored, with the
    digest and time it records; `owner` is the writing process's lease."""
    digest, at = messages_digest(messages_json), time.time()
    intent: dict[str, Any] = {"op": op, "sha256": digest, "at": at, "owner": owner}
    if previous is not None:
        intent["previous"] = dataclasses.asdict(previous)
    return orjson.dumps(intent).decode(), digest, at
