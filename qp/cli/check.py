"""`python -m qp check`: what in the database and the blob store cannot be served, and,
with --repair, its removal.

Findings younger than `min_age` seconds are left alone, so a check next to a running
server never mistakes a write in progress for damage. Every repair is a change conditional
on what was found still being so, made inside a database write transaction where it
touches a blob: beside a live server, a chat written meanwhile is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from qp.chats.model import CHAT_ID_PATTERN, is_messages_array
from qp.chats.pending import PendingWrite, blob_matches
from qp.chats.sql import ChatRows
from qp.chats.store import ChatStore
from qp.cli.common import CommandFailed, Subcommands, open_in
from qp.config import Config
from qp.startup import lock_files, storage_identity, take_claims
from qp.storage.blobs import BlobStore, chat_key
from qp.storage.claim import ClaimHeld, holder_of
from qp.storage.database import Database
from qp.storage.leases import live_owners
from qp.timestamps import epoch_seconds

CHAT_KEY = re.compile(rf"chats/({CHAT_ID_PATTERN.pattern})\.json")
# A blob call made while holding the database's write lock must end well within the time a
# server's writer waits for that lock (its busy timeout, 5 s).
BLOB_SECONDS_IN_TRANSACTION = 2.0


@dataclass(frozen=True)
class Finding:
    kind: str  # interrupted-write, row-without-blob, blob-without-row, unreadable-blob
    chat_id: str
    detail: str = ""
    # The row's updated_at when found: a repair applies only while it is unchanged.
    updated_at: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.chat_id}" + (f" ({self.detail})" if self.detail else "")


async def find_problems(
    db: Database, blobs: BlobStore, min_age: float, live_owners: set[str] | None = None
) -> list[Finding]:
    """Everything that cannot be served, oldest first by kind. On a shared database a
    write is in flight while its process's lease is live (`live_owners`)."""
    now = time.time()
    cutoff = now - min_age
    findings: list[Finding] = []
    rows_of = ChatRows(db)
    pending_rows = await rows_of.pending()
    pending = {row.chat_id for row, _ in pending_rows}
    for row, note in pending_rows:
        write = PendingWrite.read(row, note)
        if write is None:
            findings.append(Finding("interrupted-write", row.chat_id, "unreadable note"))
            continue
        if live_owners is not None and write.owner:
            if write.owner in live_owners:
                continue
        elif write.at > cutoff:
            continue
        # A write whose blob was stored is done; only its bookkeeping lagged behind.
        if not await blob_matches(blobs, row.chat_id, write.sha256):
            findings.append(Finding("interrupted-write", row.chat_id, write.op, row.updated_at))
    stored = {}
    async for blob in blobs.listing("chats/"):
        match = CHAT_KEY.fullmatch(blob.key)
        if match:
            stored[match.group(1)] = blob
    rows = dict(await rows_of.all_ids())
    for chat_id, updated_at in sorted(rows.items()):
        if chat_id in pending or epoch_seconds(updated_at) > cutoff:
            continue
        if chat_id not in stored:
            findings.append(Finding("row-without-blob", chat_id, updated_at=updated_at))
        else:
            content = await blobs.get(chat_key(chat_id))
            if content is not None and not is_messages_array(content):
                findings.append(Finding("unreadable-blob", chat_id, "not a JSON array", updated_at))
    for chat_id, blob in sorted(stored.items()):
        if chat_id not in rows and blob.modified <= cutoff:
            findings.append(Finding("blob-without-row", chat_id))
    return findings


async def repair(
    findings: list[Finding],
    db: Database,
    blobs: BlobStore,
    store: ChatStore,
    live_min_age: float | None = None,
    live_owners: set[str] | None = None,
) -> list[str]:
    """Finish or undo interrupted writes; remove rows and blobs that cannot be served.

    `live_min_age` is set beside a live server: only writes older than it are resolved
    (on a shared database: those of processes whose lease has expired, `live_owners`).
    """
    done: list[str] = []
    if any(f.kind == "interrupted-write" for f in findings):
        counts = await store.recover(older_than=live_min_age, live_owners=live_owners)
        line = f"interrupted writes: {counts['finished']} finished, {counts['undone']} undone"
        if counts["unchanged"]:
            line += f", {counts['unchanged']} left alone (written again meanwhile)"
        if counts["unresolved"]:
            line += f", {counts['unresolved']} not resolved (the blob store did not answer)"
        done.append(line)
    for finding in findings:
        if finding.kind == "interrupted-write":
            continue
        try:
            if finding.kind == "blob-without-row":
                removed = await _remove_orphan_blob(db, blobs, finding.chat_id)
                what = f"blob {chat_key(finding.chat_id)} (no row)"
            else:
                removed = await _remove_chat(db, blobs, finding)
                what = f"chat {finding.chat_id} ({finding.kind})"
        except TimeoutError:
            done.append(f"left {finding.chat_id} alone: the blob store did not answer in time")
            continue
        if removed:
            done.append(f"removed {what}")
        else:
            done.append(f"left {finding.chat_id} alone: it changed meanwhile")
    return done


async def _remove_chat(db: Database, blobs: BlobStore, finding: Finding) -> bool:
    """Delete a row that cannot be served, and its blob, only if both are still as found."""
    key = chat_key(finding.chat_id)

    async def blob_still_broken() -> bool:
        async with asyncio.timeout(BLOB_SECONDS_IN_TRANSACTION):
            content = await blobs.get(key)
            if content is None:
                return finding.kind == "row-without-blob"
            if finding.kind != "unreadable-blob" or is_messages_array(content):
                return False
            await blobs.delete(key)
            return True

    return await ChatRows(db).delete_settled(finding.chat_id, finding.updated_at, blob_still_broken)


async def _remove_orphan_blob(db: Database, blobs: BlobStore, chat_id: str) -> bool:
    """Delete a blob only while its chat has no row (no create can add one meanwhile)."""

    async def delete() -> bool:
        async with asyncio.timeout(BLOB_SECONDS_IN_TRANSACTION):
            await blobs.delete(chat_key(chat_id))
        return True

    return await ChatRows(db).without_row(chat_id, delete)


# Beside a live server, a write is only taken for abandoned this long after the server's
# own deadline for acknowledging it (clocks, scheduling).
LIVE_MARGIN_SECONDS = 5.0


async def check(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        live_min_age = _live_min_age(config, stack, args)
        min_age = args.min_age if live_min_age is None else live_min_age
        db, blobs, store = await open_in(config, stack)
        owners = await live_owners(db)
        findings = await find_problems(db, blobs, min_age, owners)
        for finding in findings:
            print(finding)
        if not findings:
            print("nothing to repair")
            return 0
        if not args.repair:
            print(f"{len(findings)} problems; run with --repair to fix them", file=sys.stderr)
            return 1
        for line in await repair(findings, db, blobs, store, live_min_age, owners):
            print(line)
    return 0


def _live_min_age(config: Config, stack: AsyncExitStack, args: argparse.Namespace) -> float | None:
    """None when nobody serves the database (with --repair, it is claimed for this run, so
    no server can start meanwhile); beside a live server, the age below which its writes
    may still be in flight."""
    holder: dict[str, Any] | None
    if config.postgres_url is not None:
        # Servers on other hosts may serve a PostgreSQL database: a write is in flight
        # while its server's lease is live (older notes, naming none: by their age).
        holder = {}
    elif args.repair:
        try:
            take_claims(config, stack)
            return None
        except ClaimHeld as held:
            holder = held.holder
    else:
        holder = holder_of(lock_files(config)[0][0])
        if holder is None:
            return None
    pid = holder.get("pid", "unknown")
    storage = holder.get("storage")
    if storage is not None and storage != storage_identity(config.storage_url):
        raise CommandFailed(
            f"a qp-server (pid {pid}) serves this database with QP_STORAGE={storage},"
            f" not {config.storage_url}: run with the server's environment"
        )
    deadline = holder.get("write_deadline")
    if not isinstance(deadline, int | float):
        deadline = config.write_deadline
    min_age = max(float(args.min_age), deadline + LIVE_MARGIN_SECONDS)
    who = (
        "qp-servers may be serving this PostgreSQL database"
        if not holder
        else (f"a qp-server (pid {pid}) is serving this database")
    )
    print(
        f"{who}: writes younger than {min_age:g} s may be in flight and are left alone",
        file=sys.stderr,
    )
    return min_age


def register(commands: Subcommands) -> None:
    help = (
        "find rows without messages, messages without rows, unreadable messages and"
        " interrupted writes; exit 1 if there are any"
    )
    command = commands.add_parser("check", help=help, description=help)
    command.set_defaults(run=check)
    command.add_argument(
        "--repair",
        action="store_true",
        help="finish or undo interrupted writes and remove what cannot be served",
    )
    command.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="leave alone anything younger (writes in progress on a running server)",
    )
