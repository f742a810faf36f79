"""ChatGarbage: deleting the blobs no row names.

A blob becomes garbage when a commit supersedes it, a delete removes its row, or its write
is given up (`QP_WRITE_ABANDON_SECONDS` after it began without committing: its intent row
is deleted first, in the same transaction that lists it as garbage, so its writer can no
longer commit it). The tables say which blobs those are, so nothing lists the bucket: a
collection costs one query and one blob delete per blob, whatever the bucket holds.
Superseded blobs are deleted just after their commit; a sweep (housekeeping) takes the
rest, and the writes given up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from qp.chats.model import blob_key
from qp.chats.sql import ChatRows
from qp.errors import StorageUnavailable
from qp.storage.blobs import BlobStore

log = logging.getLogger("qp.chats.garbage")

DEFAULT_ABANDON_SECONDS = 900.0
# Writes given up and blobs deleted per batch, batches per sweep (10,000 blobs a minute at
# most), and deletions at once just after commits (more wait for the sweep).
SWEEP_LIMIT = 500
SWEEP_BATCHES = 20
MAX_DELETING_NOW = 32


class ChatGarbage:
    def __init__(
        self, rows: ChatRows, blobs: BlobStore, abandon_seconds: float = DEFAULT_ABANDON_SECONDS
    ):
        self._rows = rows
        self._blobs = blobs
        self.abandon_seconds = abandon_seconds
        self._deleting: set[asyncio.Task[None]] = set()

    def collect_soon(self, chat_id: str, rev: str) -> None:
        """Delete a blob a commit has just made garbage, in the background (the sweep
        takes it if too many are being deleted already, or if this fails)."""
        if len(self._deleting) >= MAX_DELETING_NOW:
            return
        task = asyncio.ensure_future(self._collect_quietly([(chat_id, rev)]))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def collect_now(self, chat_id: str, rev: str) -> None:
        """Delete a blob a commit has just made garbage, before answering (a failure leaves
        it to the sweep)."""
        await self._collect_quietly([(chat_id, rev)])

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

    async def close(self) -> None:
        await asyncio.gather(*self._deleting, return_exceptions=True)

    async def _collect_quietly(self, garbage: list[tuple[str, str]]) -> None:
        try:
            await self._collect(garbage)
        except StorageUnavailable as err:
            log.info("a superseded chat blob is left for the next sweep: %s", err)

    async def _collect(self, garbage: list[tuple[str, str]]) -> int:
        """Delete the blobs, then forget their rows (a delete of a missing blob is fine)."""
        deleted: list[tuple[str, str]] = []
        try:
            for chat_id, rev in garbage:
                await self._blobs.delete(blob_key(chat_id, rev))
                deleted.append((chat_id, rev))
        finally:
            await self._rows.forget_garbage(deleted)
        return len(deleted)
