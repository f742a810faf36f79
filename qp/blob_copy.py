"""`python -m qp copy-blobs`: copy `chats/*.json` from one blob store to another.

Resumable: a blob the target already holds with the same size is skipped, so running it
again after an interruption copies only what is missing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tqdm import tqdm

from qp.blobs import BlobStore
from qp.maintenance import CHAT_KEY

COPY_CONCURRENCY = 16


@dataclass(frozen=True)
class CopyReport:
    copied: int
    skipped: int
    vanished: int  # listed at the source, gone by the time it was read


async def copy_chat_blobs(
    source: BlobStore, target: BlobStore, overwrite: bool = False, show_progress: bool = True
) -> CopyReport:
    present = {} if overwrite else {b.key: b.size async for b in target.listing("chats/")}
    wanted = [b async for b in source.listing("chats/") if CHAT_KEY.fullmatch(b.key)]
    to_copy = [b for b in wanted if present.get(b.key) != b.size]
    limiter = asyncio.Semaphore(COPY_CONCURRENCY)
    vanished = 0
    with tqdm(total=len(to_copy), unit="chat", disable=not show_progress) as progress:

        async def copy(key: str) -> None:
            nonlocal vanished
            async with limiter:
                data = await source.get(key)
                if data is None:
                    vanished += 1
                else:
                    await target.put(key, data)
                progress.update()

        await asyncio.gather(*(copy(b.key) for b in to_copy))
    return CopyReport(len(to_copy) - vanished, len(wanted) - len(to_copy), vanished)
