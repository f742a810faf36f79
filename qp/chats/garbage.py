"""ChatGarbage: deleting the blobs no row names.

A blob becomes garbage when a commit supersedes it, a delete removes its row, or its write
is given up (`QP_WRITE_ABANDON_SECONDS` after it began without committing: its intent row
is deleted first, in the same transaction that lists it as garbage, so its writer can no
longer commit it). The tables say which blobs those are, so nothing lists the bucket: a
collection costs a query and one delete request per 1,000 blobs (S3's DeleteObjects),
whatever the bucket holds. Superseded blobs are deleted a moment after their commit, many
to a request; a sweep (housekeeping) takes the rest, and the writes given up.
"""

from __future__ import annotations

import logging
import time

from qp.chats.model import blob_key
from qp.chats.sql import ChatRows
from qp.errors import StorageUnavailable
from qp.storage.batches import BatchWriter
from qp.storage.blobs import BlobStore

log = logging.getLogger("qp.chats.garbage")

DEFAULT_ABANDON_SECONDS = 900.0
# Writes given up and blobs deleted per batch, and batches per sweep (10,000 blobs a
# minute at most).
SWEEP_LIMIT = 500
SWEEP_BATCHES = 20


class ChatGarbage:
    def __init__(
        self, rows: ChatRows, blobs: BlobStore, abandon_seconds: float = DEFAULT_ABANDON_SECONDS
    ):
        self._rows = rows
        self._blobs = blobs
        self.abandon_seconds = abandon_seconds
        # Blobs superseded by commits, deleted a moment later many to a request, then their
        # rows forgotten (a batch that fails is left to the sweep).
        self._superseded: BatchWriter[tuple[str, str]] = BatchWriter(
            self._delete_superseded, "superseded chat blobs (left for the sweep)"
        )

    def collect_soon(self, chat_id: str, rev: str) -> None:
        """Delete a blob a commit has just made garbage, in the background, with others.
        The worker's key (rev "") waits for the sweep, which deletes it only while no row
        names it: an import may name it again."""
        if rev:
            self._superseded.add((chat_id, rev))

    async def collect_now(self, chat_id: str, rev: str) -> None:
        """Delete a blob a commit has just made garbage, before answering (a failure leaves
        it to the sweep)."""
        await self._delete_quietly(chat_id, rev)

    async def sweep(self) -> int:
        """Give up on writes older than the bound, then delete garbage blobs, in batches
        of SWEEP_LIMIT, at most SWEEP_BATCHES of each; answers how many were deleted."""
        now = time.time()
        for _ in range(SWEEP_BATCHES):
            given_up = await self._rows.expire_writes(now - self.abandon_seconds, now, SWEEP_LIMIT)
            if given_up < SWEEP_LIMIT:
                break
        deleted = 0
        for _ in range(SWEEP_BATCHES):
            batch = await self._collect(await self._rows.garbage(SWEEP_LIMIT))
            deleted += batch
            if batch < SWEEP_LIMIT:
                break
        return deleted

    async def flush(self) -> None:
        """Delete now the superseded blobs waiting to be deleted."""
        await self._superseded.flush()

    async def close(self) -> None:
        await self._superseded.close()

    async def _delete_superseded(self, garbage: list[tuple[str, str]]) -> None:
        await self._blobs.delete_many([blob_key(chat_id, rev) for chat_id, rev in garbage])
        await self._rows.forget_garbage(garbage)

    async def _delete_quietly(self, chat_id: str, rev: str) -> None:
        try:
            await self._blobs.delete(blob_key(chat_id, rev))
        except StorageUnavailable as err:
            log.info("a deleted chat's blob is left for the next sweep: %s", err)
            return
        await self._rows.forget_garbage([(chat_id, rev)])

    async def _collect(self, garbage: list[tuple[str, str]]) -> int:
        """Delete the blobs, then forget their rows (a delete of a missing blob is fine)."""
        if garbage:
            await self._delete_superseded(garbage)
        return len(garbage)
