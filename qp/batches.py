"""BatchWriter: items handed over now, written in the background, many to a transaction.

For writes nobody has to wait for (ledger rows, marking chat writes as settled): the disk
sync happens at most FLUSH_SECONDS later, off the path of the requests that follow.
Items queued at shutdown are written before the database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from qp.errors import StorageUnavailable

log = logging.getLogger("qp.batches")
T = TypeVar("T")


class BatchWriter(Generic[T]):
    FLUSH_SECONDS = 0.5

    def __init__(self, write_batch: Callable[[list[T]], Awaitable[None]], what: str):
        self._write_batch = write_batch
        self._what = what
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def add(self, item: T) -> None:
        self._queue.put_nowait(item)

    async def flush(self) -> None:
        """Write every item handed over so far, now."""
        self._wake.set()
        await self._queue.join()

    async def close(self) -> None:
        """Write what is queued, then stop."""
        await self.flush()
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
                await self._write_batch(batch)
            except StorageUnavailable as err:
                log.error("%d %s not written: %s", len(batch), self._what, err)
            finally:
                for _ in batch:
                    self._queue.task_done()
