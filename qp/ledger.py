"""SpendLedger: completion records written in the background, in batches.

A stream never waits on the disk for its ledger row: the relay hands the record over and
returns. Rows are written at most FLUSH_SECONDS after they are handed over, many to a
transaction, so the ledger's disk syncs stay off the path of the next request. Rows queued
at shutdown are written before the database closes; a crash loses at most FLUSH_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from qp.db import Database
from qp.errors import StorageUnavailable
from qp.usage import CompletionRecord

log = logging.getLogger("qp.ledger")


class SpendLedger:
    FLUSH_SECONDS = 0.5

    def __init__(self, db: Database):
        self._db = db
        self._queue: asyncio.Queue[CompletionRecord] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def record(self, record: CompletionRecord) -> None:
        self._queue.put_nowait(record)

    async def flush(self) -> None:
        """Write every record handed over so far, now."""
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
                await self._db.insert_completions(batch)
            except StorageUnavailable as err:
                log.error("%d ledger rows not written: %s", len(batch), err)
            finally:
                for _ in batch:
                    self._queue.task_done()
