"""What every command shares: the server's storage opened, one-line failures, tables."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from qp.chats.cache import ChatCache
from qp.chats.store import ChatStore
from qp.chats.upgrade import resolve_old_writes
from qp.config import Config
from qp.errors import StorageUnavailable
from qp.startup import Processes, disk_space, open_storage
from qp.storage.blobs import BlobStore
from qp.storage.database import Database

PROGRAM = "python -m qp"


# What a command family adds its commands to (argparse's sub-parsers action).
if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # not subscriptable at run time
    Subcommands = argparse._SubParsersAction


class CommandFailed(Exception):
    """The command cannot do what was asked; the message is one line saying why."""


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[tuple[Database, BlobStore, ChatStore]]:
    async with AsyncExitStack() as stack:
        yield await open_in(config, stack)


async def open_in(config: Config, stack: AsyncExitStack) -> tuple[Database, BlobStore, ChatStore]:
    """The server's storage, closed by `stack`. On a full disk, a delete may take the
    server's disk reserve."""
    db, _, blobs, store = await open_all(config, stack)
    return db, blobs, store


async def open_all(
    config: Config, stack: AsyncExitStack
) -> tuple[Database, Processes, BlobStore, ChatStore]:
    """As `open_in`, with what differs between one server process and several."""
    space = disk_space(config)
    db, processes, blobs = await open_storage(
        config, stack, reader_count=1, space=space, serving=False
    )
    try:
        await resolve_old_writes(db, blobs)
    except StorageUnavailable as err:
        raise CommandFailed(f"cannot resolve the writes an older version left: {err}") from None
    store = ChatStore(
        db,
        blobs,
        ChatCache(0),
        processes.peers,
        space=space,
        abandon_seconds=config.write_abandon_seconds,
    )
    stack.push_async_callback(store.close)
    return db, processes, blobs, store


def table(rows: Sequence[Sequence[Any]], header: tuple[str, ...]) -> str:
    cells = [header, *[tuple("" if v is None else str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
