"""`python -m qp copy-blobs`: copy `chats/*.json` from one blob store to another.

Resumable: a blob the target already holds with the same size is skipped, so running it
again after an interruption copies only what is missing.
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass

from tqdm import tqdm

from qp.cli.check import CHAT_KEY
from qp.cli.common import CommandFailed, Subcommands
from qp.config import Config, ConfigError, validate_storage_url
from qp.startup import open_blob_store
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
        report = await copy_chat_blobs(source, target, overwrite=args.overwrite)
    print(
        f"{report.copied} copied, {report.skipped} already there"
        + (f", {report.vanished} gone before they were read" if report.vanished else "")
    )
    return 0


def register(commands: Subcommands) -> None:
    help = (
        "copy chats/*.json between blob stores (file://PATH or s3://BUCKET[/PREFIX]);"
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
