"""`python -m qp copy-blobs`: copy the chats' blobs from one blob store to another.

As they are (every `chats/{chatId}/{rev}.json`, and the worker's `chats/{chatId}.json`):
resumable, since a key is never written twice with other content, so a blob the target
already holds with the same size is skipped. With `--layout worker`: each chat's current
messages, as the database names them, written to the worker's key `chats/{chatId}.json`,
for an operator going back to the worker (written again each run).
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass

from tqdm import tqdm

from qp.chats.model import blob_key, parse_blob_key
from qp.chats.sql import ChatRows
from qp.cli.common import CommandFailed, Subcommands
from qp.config import Config, ConfigError, validate_storage_url
from qp.startup import open_blob_store, open_database
from qp.storage.blobs import BlobStore, StoreNotReady

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
    wanted = [b async for b in source.listing("chats/") if parse_blob_key(b.key) is not None]
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


async def write_worker_layout(
    rows: ChatRows, source: BlobStore, target: BlobStore, show_progress: bool = True
) -> CopyReport:
    """Every chat's messages, read where its row names them, written at the worker's key."""
    named = await rows.all_named()
    limiter = asyncio.Semaphore(COPY_CONCURRENCY)
    vanished = 0
    with tqdm(total=len(named), unit="chat", disable=not show_progress) as progress:

        async def copy(chat_id: str) -> None:
            nonlocal vanished
            async with limiter:
                # Read the row again: the chat may have been written since the list.
                row = await rows.one(chat_id)
                data = await source.get(row.blob_key) if row is not None else None
                if data is None:
                    vanished += 1
                else:
                    await target.put(blob_key(chat_id, None), data)
                progress.update()

        await asyncio.gather(*(copy(chat_id) for chat_id in named))
    return CopyReport(len(named) - vanished, 0, vanished)


async def copy_blobs(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        stores = []
        for url, endpoint, profile, name in (
            (args.source, args.from_endpoint_url, args.from_profile, "--from"),
            (args.target, args.to_endpoint_url, args.to_profile, "--to"),
        ):
            try:
                validate_storage_url(url, name)
                stores.append(
                    await open_blob_store(url, endpoint, config.aws_region, stack, profile)
                )
            except (ConfigError, StoreNotReady) as err:
                raise CommandFailed(f"{name} {url}: {err}") from None
        source, target = stores
        if args.layout == "worker":
            db = await open_database(config, reader_count=1, serving=False)
            stack.push_async_callback(db.close)
            report = await write_worker_layout(ChatRows(db), source, target)
        else:
            report = await copy_chat_blobs(source, target, overwrite=args.overwrite)
    print(
        f"{report.copied} copied, {report.skipped} already there"
        + (f", {report.vanished} gone before they were read" if report.vanished else "")
    )
    return 0


def register(commands: Subcommands) -> None:
    help = (
        "copy the chats' blobs between blob stores (file://PATH or s3://BUCKET[/PREFIX]);"
        " resumable: what the target already holds is skipped"
    )
    command = commands.add_parser("copy-blobs", help=help, description=help)
    command.set_defaults(run=copy_blobs)
    command.add_argument("--from", dest="source", required=True, metavar="URL")
    command.add_argument("--to", dest="target", required=True, metavar="URL")
    command.add_argument("--from-endpoint-url", help="S3 endpoint of the source (default AWS)")
    command.add_argument("--to-endpoint-url", help="S3 endpoint of the target (default AWS)")
    command.add_argument("--from-profile", help="~/.aws profile for the source's credentials")
    command.add_argument("--to-profile", help="~/.aws profile for the target's credentials")
    command.add_argument("--overwrite", action="store_true", help="copy even what is there")
    command.add_argument(
        "--layout",
        choices=("as-is", "worker"),
        default="as-is",
        help="worker: each chat's current messages at chats/{chatId}.json, as the worker"
        " reads them (from the rows of QP_DATABASE)",
    )
