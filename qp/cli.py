"""The operators' command line: `python -m qp COMMAND ...`.

It works on the same database and blob store as the server (the same environment
variables), and can run beside it: the server notices changes to the database within a
second.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from qp.app import (
    StartupError,
    disk_space,
    lock_files,
    open_storage,
    storage_identity,
    take_claims,
)
from qp.blob_copy import copy_chat_blobs
from qp.blobs import BlobStore, StoreNotReady, open_blob_store
from qp.chat_cache import ChatCache
from qp.chat_model import is_valid_chat_id
from qp.chat_store import ChatStore
from qp.claim import ClaimHeld, holder_of
from qp.config import Config, ConfigError, load_config, validate_storage_url
from qp.d1_import import DumpRefused, parse_dump
from qp.db import Database, SchemaTooNew
from qp.errors import StorageUnavailable
from qp.maintenance import find_problems, repair
from qp.timestamps import parse_iso, utc_now_iso

PROGRAM = "python -m qp"


class CommandFailed(Exception):
    """The command cannot do what was asked; the message is one line saying why."""


@asynccontextmanager
async def opened(config: Config) -> AsyncIterator[tuple[Database, BlobStore, ChatStore]]:
    async with AsyncExitStack() as stack:
        yield await open_in(config, stack)


async def open_in(config: Config, stack: AsyncExitStack) -> tuple[Database, BlobStore, ChatStore]:
    """The server's storage, closed by `stack`. On a full disk, a delete may take the
    server's disk reserve."""
    space = disk_space(config)
    db, blobs = await open_storage(config, stack, reader_count=1, space=space)
    store = ChatStore(db, blobs, ChatCache(0), write_deadline=config.write_deadline, space=space)
    stack.push_async_callback(store.close)
    return db, blobs, store


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    cells = [header, *[tuple("" if v is None else str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


# --- chats ---------------------------------------------------------------------------------


async def chats_list(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (db, _, _):
        rows = await db.recent_chat_rows(args.app, args.limit)
    print(
        table(
            [
                (r.chat_id, r.updated_at, r.model, r.prompt_tokens, r.completion_tokens)
                for r in rows
            ],
            ("CHAT ID", "UPDATED", "MODEL", "PROMPT", "COMPLETION"),
        )
    )
    print(f"{len(rows)} chats of app {args.app}", file=sys.stderr)
    return 0


async def chats_show(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (_, _, store):
        chat = await store.get_json(args.chat_id) if is_valid_chat_id(args.chat_id) else None
    if chat is None:
        raise CommandFailed(f"no chat {args.chat_id}")
    print(orjson.dumps(orjson.loads(chat), option=orjson.OPT_INDENT_2).decode())
    return 0


async def chats_delete(args: argparse.Namespace, config: Config) -> int:
    if not is_valid_chat_id(args.chat_id):
        raise CommandFailed(f"{args.chat_id!r} is not a chat id")
    async with opened(config) as (_, _, store):
        await store.delete(args.chat_id)
    print(f"deleted chat {args.chat_id} (if it existed)")
    return 0


# --- usage and blocks ------------------------------------------------------------------------


async def usage(args: argparse.Namespace, config: Config) -> int:
    since = None
    if args.since:
        since = parse_iso(args.since)
        if since is None:
            raise CommandFailed(f"--since {args.since!r} is not an ISO date")
    async with opened(config) as (db, _, _):
        totals = await db.usage_totals(since, args.app)
    print(
        table(
            [
                (
                    t.app,
                    t.model,
                    t.payer,
                    t.completions,
                    t.prompt_tokens,
                    t.completion_tokens,
                    f"{t.cost:.6f}",
                    t.client_left,
                )
                for t in totals
            ],
            ("APP", "MODEL", "PAYER", "COMPLETIONS", "PROMPT", "COMPLETION", "COST", "LEFT"),
        )
    )
    return 0


async def blocks_list(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (db, _, _):
        blocks = await db.active_blocks(utc_now_iso())
    print(table(blocks, ("CLIENT HASH", "BLOCKED UNTIL")))
    return 0


async def blocks_lift(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (db, _, _):
        if not await db.delete_block(args.client_hash):
            raise CommandFailed(f"no block for {args.client_hash}")
    print(f"lifted the block on {args.client_hash} (a running server follows within a second)")
    return 0


# --- check, import, copy ---------------------------------------------------------------------


# Beside a live server, a write is only taken for abandoned this long after the server's
# own deadline for acknowledging it (clocks, scheduling).
LIVE_MARGIN_SECONDS = 5.0


async def check(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        live_min_age = _live_min_age(config, stack, args)
        min_age = args.min_age if live_min_age is None else live_min_age
        db, blobs, store = await open_in(config, stack)
        findings = await find_problems(db, blobs, min_age)
        for finding in findings:
            print(finding)
        if not findings:
            print("nothing to repair")
            return 0
        if not args.repair:
            print(f"{len(findings)} problems; run with --repair to fix them", file=sys.stderr)
            return 1
        for line in await repair(findings, db, blobs, store, live_min_age):
            print(line)
    return 0


def _live_min_age(config: Config, stack: AsyncExitStack, args: argparse.Namespace) -> float | None:
    """None when nobody serves the database (with --repair, it is claimed for this run, so
    no server can start meanwhile); beside a live server, the age below which its writes
    may still be in flight."""
    holder: dict[str, Any] | None
    if args.repair:
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
    min_age = max(args.min_age, deadline + LIVE_MARGIN_SECONDS)
    print(
        f"a qp-server (pid {pid}) is serving this database: writes younger than"
        f" {min_age:g} s may be in flight and are left alone",
        file=sys.stderr,
    )
    return min_age


async def import_d1(args: argparse.Namespace, config: Config) -> int:
    try:
        dump = parse_dump(args.file)
    except OSError as err:
        raise CommandFailed(f"cannot read {args.file}: {err.strerror}") from None
    for chat_id, why in dump.refused:
        print(f"not imported: {chat_id!r}: {why}", file=sys.stderr)
    async with opened(config) as (db, _, _):
        added, replaced, unchanged = await db.import_chats(dump.rows)
    print(
        f"{added} chats added, {replaced} replaced by newer, {unchanged} unchanged,"
        f" {len(dump.refused)} refused"
    )
    print("now copy their messages: python -m qp copy-blobs --from ... --to ...", file=sys.stderr)
    return 0


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
        report = await copy_chat_blobs(*stores, overwrite=args.overwrite)
    print(
        f"{report.copied} copied, {report.skipped} already there"
        + (f", {report.vanished} gone before they were read" if report.vanished else "")
    )
    return 0


# --- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="qp-server's operator tools. They use the server's environment"
        " (QP_DATA_DIR, QP_DATABASE, QP_STORAGE, ...).",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: Callable, help: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    chats = commands.add_parser("chats", help="list, show or delete chats")
    chats_commands = chats.add_subparsers(title="commands", required=True, metavar="COMMAND")
    sub = command("list", chats_list, "an app's chats, newest first", chats_commands)
    sub.add_argument("--app", required=True)
    sub.add_argument("--limit", type=int, default=1000)
    sub = command("show", chats_show, "one chat as GET /api/chats/ID answers it", chats_commands)
    sub.add_argument("chat_id", metavar="ID")
    sub = command("delete", chats_delete, "remove a chat's row and messages", chats_commands)
    sub.add_argument("chat_id", metavar="ID")

    sub = command("usage", usage, "completions, tokens and cost by app, model and payer")
    sub.add_argument("--app")
    sub.add_argument("--since", metavar="DATE", help="an ISO date or date-time")

    blocks = commands.add_parser("blocks", help="clients blocked for rate-limit violations")
    blocks_commands = blocks.add_subparsers(title="commands", required=True, metavar="COMMAND")
    command("list", blocks_list, "the blocks in force", blocks_commands)
    sub = command("lift", blocks_lift, "lift one block", blocks_commands)
    sub.add_argument("client_hash", metavar="HASH")

    sub = command(
        "check",
        check,
        "find rows without messages, messages without rows, unreadable messages and"
        " interrupted writes; exit 1 if there are any",
    )
    sub.add_argument(
        "--repair",
        action="store_true",
        help="finish or undo interrupted writes and remove what cannot be served",
    )
    sub.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="leave alone anything younger (writes in progress on a running server)",
    )

    sub = command("import-d1", import_d1, "load the chats rows of a `wrangler d1 export` dump")
    sub.add_argument("file", type=Path, metavar="FILE")

    sub = command(
        "copy-blobs",
        copy_blobs,
        "copy chats/*.json between blob stores (file://PATH or s3://BUCKET[/PREFIX]);"
        " resumable: what the target already holds is skipped",
    )
    sub.add_argument("--from", dest="source", required=True, metavar="URL")
    sub.add_argument("--to", dest="target", required=True, metavar="URL")
    sub.add_argument("--from-endpoint-url", help="S3 endpoint of the source (default AWS)")
    sub.add_argument("--to-endpoint-url", help="S3 endpoint of the target (default AWS)")
    sub.add_argument("--from-profile", help="~/.aws profile for the source's credentials")
    sub.add_argument("--to-profile", help="~/.aws profile for the target's credentials")
    sub.add_argument("--overwrite", action="store_true", help="copy even what is there")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config()
        return asyncio.run(args.run(args, config))
    except (
        CommandFailed,
        ConfigError,
        StartupError,
        DumpRefused,
        SchemaTooNew,
        StorageUnavailable,
        sqlite3.Error,
    ) as err:
        print(f"{PROGRAM}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
