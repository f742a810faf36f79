"""BatchWriter on its own: the background writer never dies, and says what it gave up."""

from __future__ import annotations

import asyncio
import time

from qp.errors import StorageUnavailable
from qp.storage.batches import BatchWriter


class QuickBatchWriter(BatchWriter):
    FLUSH_SECONDS = 0.01
    RETRY_SECONDS = (0.01, 0.01)
    CLOSE_SECONDS = 0.5


async def test_an_item_the_database_cannot_take_is_dropped_and_the_rest_written():
    written: list[str] = []
    drops: list[tuple[int, str]] = []

    async def write(batch: list[str]) -> None:
        if "unstorable" in batch:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        written.extend(batch)

    writer = QuickBatchWriter(write, "rows", lambda count, reason: drops.append((count, reason)))
    for item in ("a", "unstorable", "b"):
        writer.add(item)
    await writer.flush()
    writer.add("c")  # the writer lives on
    await writer.flush()
    await writer.close()
    assert (written, drops, writer.dropped) == (["a", "b", "c"], [(1, "refused")], 1)


async def test_a_batch_the_database_refuses_is_retried_then_dropped():
    attempts: list[list[str]] = []
    down = True

    async def write(batch: list[str]) -> None:
        attempts.append(batch)
        if down:
            raise StorageUnavailable("Database", "database is locked")

    drops: list[tuple[int, str]] = []
    writer = QuickBatchWriter(write, "rows", lambda count, reason: drops.append((count, reason)))
    writer.add("a")
    await writer.flush()
    assert (attempts, writer.dropped, drops) == ([["a"]] * 3, 1, [(1, "unavailable")])
    down = False
    writer.add("b")
    await writer.flush()
    await writer.close()
    assert attempts[-1] == ["b"] and writer.dropped == 1


async def test_close_gives_up_in_time_when_the_database_hangs():
    async def hang(batch: list[str]) -> None:
        await asyncio.sleep(3600)

    writer = QuickBatchWriter(hang, "rows")
    writer.add("a")
    started = time.monotonic()
    await writer.close()
    assert time.monotonic() - started < 2
