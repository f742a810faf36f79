"""BatchWriter: items handed over now, written in the background, many to a transaction.

For writes nobody has to wait for (ledger rows, deleting superseded chat blobs): the disk
sync happens at most FLUSH_SECONDS later, off the path of the requests that follow.
Items queued at shutdown are written before the database closes, for CLOSE_SECONDS at
most.

The background task must never die: a batch the database refuses (down, full) is retried
a few times and then dropped; a batch it cannot take (a value it cannot store) is written
item by item and the items it still refuses are dropped, the rest kept. Every drop is
logged (by the error's kind: an item's values may be keys or chat ids) and counted, by
why: UNAVAILABLE, REFUSED, QUEUE_FULL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from qp.errors import StorageUnavailable, UnstorableValue

log = logging.getLogger("qp.storage.batches")
T = TypeVar("T")

# Why items were dropped: the database stayed away (or the server was closing), it refused
# their values, or too many waited.
UNAVAILABLE = "unavailable"
REFUSED = "refused"
QUEUE_FULL = "queue_full"
DROP_REASONS = (UNAVAILABLE, REFUSED, QUEUE_FULL)


class BatchWriter(Generic[T]):
    FLUSH_SECONDS = 0.5
    # Waits before each retry of a batch the database refused.
    RETRY_SECONDS = (0.5, 2.0, 5.0)
    # Items waiting at most; past it new items are dropped (the database is long gone).
    MAX_QUEUED = 100_000
    CLOSE_SECONDS = 5.0

    def __init__(
        self,
        write_batch: Callable[[list[T]], Awaitable[None]],
        what: str,
        on_drop: Callable[[int, str], None] | None = None,
    ):
        self._write_batch = write_batch
        self._what = what
        self._on_drop = on_drop
        self.dropped = 0
        self._closing = False
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def add(self, item: T) -> None:
        if self._queue.qsize() >= self.MAX_QUEUED:
            self._drop(1, QUEUE_FULL, "the queue is full")
            return
        self._queue.put_nowait(item)

    async def flush(self) -> None:
        """Write every item handed over so far, now."""
        self._wake.set()
        await self._queue.join()

    async def close(self) -> None:
        """Write what is queued (for CLOSE_SECONDS at most), then stop."""
        self._closing = True
        try:
            async with asyncio.timeout(self.CLOSE_SECONDS):
                await self.flush()
        except TimeoutError:
            log.error("%d %s not written before shutdown", self._queue.qsize(), self._what)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.FLUSH_SECONDS)
            self._wake.clear()
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as err:  # the task must live on, whatever a batch does
                self._drop(len(batch), REFUSED, type(err).__name__)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[T]) -> None:
        for wait in (*self.RETRY_SECONDS, None):
            try:
                await self._write_batch(batch)
                return
            except StorageUnavailable as err:
                if wait is None or self._closing:
                    self._drop(len(batch), UNAVAILABLE, str(err))
                    return
                log.warning("%d %s not written yet (%s); retrying", len(batch), self._what, err)
                await asyncio.sleep(wait)
            except Exception as err:
                # Something in the batch the database cannot take: the rest still goes in.
                if len(batch) == 1:
                    why = str(err) if isinstance(err, UnstorableValue) else type(err).__name__
                    self._drop(1, REFUSED, why)
                    return
                for item in batch:
                    await self._write([item])
                return

    def _drop(self, count: int, reason: str, why: str) -> None:
        self.dropped += count
        if self._on_drop is not None:
            self._on_drop(count, reason)
        log.error("%d %s dropped: %s", count, self._what, why)
