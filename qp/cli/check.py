"""`python -m qp check`: what in the database and the blob store cannot be served, and,
with --repair, its removal; and a count of the bytes stored that the rows do not bear out,
counted again.

Findings younger than `min_age` seconds are left alone, so a check beside a running
server (or an operator's copy of blobs still in progress) is not mistaken for damage.
Repairs are conditional on what was found: a row is removed only while it still names the
revision found broken; a blob no row names is removed only if the tables know of no write
that may still commit it (writes in flight are the collector's, by their bound).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

from qp.chats.model import blob_key, is_messages_array, parse_blob_key
from qp.chats.sql import ChatRows
from qp.chats.store import ChatStore
from qp.cli.common import CommandFailed, Subcommands, open_in
from qp.config import Config
from qp.masking import mask_url
from qp.startup import lock_files, storage_identity
from qp.storage.blobs import BlobStore
from qp.storage.claim import holder_of
from qp.storage.database import Database
from qp.timestamps import epoch_seconds


@dataclass(frozen=True)
class Finding:
    kind: str  # row-without-blob, unreadable-blob, blob-without-row, bytes-miscounted
    chat_id: str
    # The revision concerned ("" for the worker's key): a repair applies only to it.
    rev: str = ""
    detail: str = ""

    def __str__(self) -> str:
        where = f" {blob_key(self.chat_id, self.rev)}" if self.kind == "blob-without-row" else ""
        what = f"{self.kind} {self.chat_id}{where}" if self.chat_id else self.kind
        return what + (f" ({self.detail})" if self.detail else "")


async def find_problems(db: Database, blobs: BlobStore, min_age: float) -> list[Finding]:
    """Everything that cannot be served, and blobs nothing will ever serve or collect."""
    cutoff = time.time() - min_age
    rows_of = ChatRows(db)
    # The listing first: a blob it shows was put after its write's intent was recorded,
    # so the tables read after it know of that write (or of the row that names it now).
    stored = {}
    async for blob in blobs.listing("chats/"):
        parsed = parse_blob_key(blob.key)
        if parsed is not None:
            stored[parsed] = blob
    named = await rows_of.all_named()
    findings: list[Finding] = []
    for chat_id, (rev, updated_at) in sorted(named.items()):
        if epoch_seconds(updated_at) > cutoff:
            continue
        if (chat_id, rev) not in stored:
            findings.append(Finding("row-without-blob", chat_id, rev))
            continue
        content = await blobs.get(blob_key(chat_id, rev))
        if content is not None and not is_messages_array(content):
            findings.append(Finding("unreadable-blob", chat_id, rev, "not a JSON array"))
    # What the tables know, read after the listing and in one snapshot: a listed blob was
    # put after its intent was recorded, so they know it unless it has gone all its way
    # since (intent, row, garbage, deleted), in which case the listing again drops it.
    known = await rows_of.known_blobs()
    unnamed = {key for key, blob in stored.items() if key not in known and blob.modified <= cutoff}
    if unnamed:
        still = {parsed async for b in blobs.listing("chats/") if (parsed := parse_blob_key(b.key))}
        findings += [Finding("blob-without-row", *key) for key in sorted(unnamed & still)]
    counted, held = await rows_of.counted_and_held()
    if counted != held:
        detail = f"counted {counted}, the rows hold {held}"
        findings.append(Finding("bytes-miscounted", "", detail=detail))
    return findings


async def repair(
    findings: list[Finding], db: Database, blobs: BlobStore, store: ChatStore
) -> list[str]:
    """Remove rows that cannot be served and blobs no row names (with the garbage the
    tables list, and the writes given up by their bound)."""
    rows = ChatRows(db)
    done: list[str] = []
    unnamed = [(f.chat_id, f.rev) for f in findings if f.kind == "blob-without-row"]
    await rows.add_unnamed(unnamed, time.time())
    for finding in findings:
        if finding.kind == "bytes-miscounted":
            await rows.count_again()
            done.append("counted the bytes stored again")
            continue
        if finding.kind == "blob-without-row":
            continue
        key = blob_key(finding.chat_id, finding.rev)
        content = await blobs.get(key)
        still_broken = (
            content is None
            if finding.kind == "row-without-blob"
            else (content is not None and not is_messages_array(content))
        )
        if still_broken and await rows.delete_broken(finding.chat_id, finding.rev):
            await rows.add_garbage([(finding.chat_id, finding.rev)], time.time())
            done.append(f"removed chat {finding.chat_id} ({finding.kind})")
        else:
            done.append(f"left {finding.chat_id} alone: it changed meanwhile")
    collected = 0
    while swept := await store.garbage.sweep():
        collected += swept
    if collected:
        done.append(f"deleted {collected} blobs no row names")
    return done


async def check(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        _refuse_another_store(config)
        db, blobs, store = await open_in(config, stack)
        findings = await find_problems(db, blobs, args.min_age)
        for finding in findings:
            print(finding)
        if not findings:
            print("nothing to repair")
        elif not args.repair:
            print(f"{len(findings)} problems; run with --repair to fix them", file=sys.stderr)
            return 1
        if args.repair:
            for line in await repair(findings, db, blobs, store):
                print(line)
    return 0


def _refuse_another_store(config: Config) -> None:
    """Beside a live SQLite server, only with the server's own blob store: elsewhere every
    blob would look missing."""
    if config.postgres_url is not None:
        return
    holder = holder_of(lock_files(config)[0][0])
    if holder is None:
        return
    storage = holder.get("storage")
    if storage is not None and storage != storage_identity(config.storage_url):
        raise CommandFailed(
            f"a qp-server (pid {holder.get('pid', 'unknown')}) serves this database with"
            f" QP_STORAGE={mask_url(storage)}, not {mask_url(config.storage_url)}:"
            " run with the server's environment"
        )


def register(commands: Subcommands) -> None:
    help = (
        "find rows without messages, unreadable messages, messages no row names and a"
        " miscounted total of bytes stored; exit 1 if there are any"
    )
    command = commands.add_parser("check", help=help, description=help)
    command.set_defaults(run=check)
    command.add_argument(
        "--repair",
        action="store_true",
        help="remove what cannot be served and the blobs no row names; count the total again",
    )
    command.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="leave alone anything younger (copies in progress)",
    )
