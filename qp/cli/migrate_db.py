"""`python -m qp migrate-db --from sqlite:///data/qp.sqlite3 --to postgresql://...`: copy a
database (chats' rows, the ledger, the blocks in force, the settings with the address-hash
salt, model prices) into another, with a progress bar. The blobs stay where they are:
point the servers at the same QP_STORAGE.

The source and the target must be two databases: each is given an id of its own (a
settings row) the first time it is copied from or into, and the same id on both sides,
however the two URLs spell it, is the same database (or a copy of it). The target must
hold nothing at all unless `--append` is given (stop the servers of a target being
appended to: a server's write to a chat being copied is overwritten by an older copy only
if that copy's `updated_at` is newer). Every row is copied at most once, so the same
command can be run again, after an interruption or not: chats are upserted by id, with
the revision that names their blob (the newer `updated_at` wins), blocks and prices by
their key, and the ledger's progress from each source is kept in the target beside each
batch, for good.

A row holding a NUL character (older versions stored such chats and completions on
SQLite; PostgreSQL's text cannot hold one, and the server refuses them now) is not
copied: the command names it on stderr (table and chat id or ledger id), carries on, and
says in its last line how many it left behind, exiting with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from tqdm import tqdm

from qp.chats.sql import ChatRows
from qp.chats.upgrade import has_old_writes
from qp.cli.common import CommandFailed, Subcommands
from qp.config import Config, ConfigError, load_config
from qp.masking import mask_url
from qp.protection.blocks import active_blocks, save_block
from qp.protection.client_address import keep_salt, stored_salt
from qp.spend.ledger import INSERT as LEDGER_INSERT
from qp.spend.ledger import ledger_page, ledger_size
from qp.startup import open_database
from qp.storage.database import Database, Transaction
from qp.timestamps import utc_now_iso

CHATS_PER_BATCH = 500
LEDGER_PER_BATCH = 2000
# Settings rows the copy keeps: each database's id; in the target, which source is being
# copied (until done) and how far the ledger of each source got (for good).
DATABASE_ID = "migrate_db:database_id"
SOURCE_MARK = "migrate_db:source"
LEDGER_MARK = "migrate_db:ledger_after:{}"
READ_MARK = "SELECT value FROM settings WHERE name = ?"
WRITE_MARK = """
    INSERT INTO settings (name, value) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
KEEP_ID = "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
# What a target may hold that makes it not empty: a kind of row (as the refusal names
# it), its table, and how many it holds. budget_accounts is PostgreSQL's only.
HELD = (
    ("chats", "chats", "SELECT COUNT(*) FROM chats"),
    ("ledger rows", "completions", "SELECT COUNT(*) FROM completions"),
    ("blocks", "blocks", "SELECT COUNT(*) FROM blocks"),
    ("budget accounts", "budget_accounts", "SELECT COUNT(*) FROM budget_accounts"),
    ("prices", "prices", "SELECT COUNT(*) FROM prices"),
    ("chat blobs to collect", "chat_garbage", "SELECT COUNT(*) FROM chat_garbage"),
    ("chat writes", "chat_writes", "SELECT COUNT(*) FROM chat_writes"),
    ("address-hash salts", "settings", "SELECT COUNT(*) FROM settings WHERE name = 'ip_salt'"),
)
LEDGER_END = "SELECT COALESCE(MAX(id), 0) FROM completions"
PRICES = "SELECT model, prompt, completion, fetched_at FROM prices"
KEEP_PRICE = """
    INSERT INTO prices (model, prompt, completion, fetched_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (model) DO UPDATE SET prompt = excluded.prompt,
        completion = excluded.completion, fetched_at = excluded.fetched_at
"""


async def migrate_db(args: argparse.Namespace, config: Config) -> int:
    source_config = _config_for(args.source, config)
    target_config = _config_for(args.target, config)
    shown = mask_url(args.source)
    async with AsyncExitStack() as stack:
        source = await open_database(source_config, reader_count=1, serving=False)
        stack.push_async_callback(source.close)
        target = await open_database(target_config, reader_count=1, serving=False)
        stack.push_async_callback(target.close)
        source_id = await _database_id(source)
        if await _database_id(target) == source_id:
            raise CommandFailed(
                "the source and the target are the same database (or copies of one):"
                " give --to another database"
            )
        resuming = await _check_target(target, source_id, shown, args.append)
        if await has_old_writes(source):
            raise CommandFailed(
                "the source has chat writes an older version left unfinished: run `python -m"
                " qp check` on it first"
            )
        await target.execute_write(WRITE_MARK, (SOURCE_MARK, f"{source_id} {shown}"))
        copy = Copy(source, target, source_id)
        await copy.run(not args.no_progress)
        await target.execute_write("DELETE FROM settings WHERE name = ?", (SOURCE_MARK,))
    verb = "carried on copying" if resuming else "copied"
    print(
        f"{verb} {copy.chats} chats, {copy.ledger} ledger rows and {copy.blocks} blocks from"
        f" {shown} to {mask_url(args.target)}"
        + (f"; {copy.left} rows not copied (named above)" if copy.left else "")
    )
    return 1 if copy.left else 0


def _config_for(url: str, config: Config) -> Config:
    try:
        found = load_config({"QP_DATA_DIR": str(config.data_dir), "QP_DATABASE": url})
    except ConfigError as err:
        raise CommandFailed(str(err)) from None
    return found


async def _database_id(db: Database) -> str:
    """The database's own id, given the first time it is copied from or into."""
    await db.execute_write(KEEP_ID, (DATABASE_ID, secrets.token_hex(16)))
    found = await db.fetchone(READ_MARK, (DATABASE_ID,))
    assert found is not None
    return str(found[0])


async def _check_target(target: Database, source_id: str, source: str, append: bool) -> bool:
    """Whether this run resumes an interrupted copy of the same source; refuses a target
    that holds anything else, unless appending."""
    mark = await target.fetchone(READ_MARK, (SOURCE_MARK,))
    if mark is not None:
        marked_id, _, marked = str(mark[0]).partition(" ")
        if marked_id != source_id:
            raise CommandFailed(
                f"the target holds an unfinished copy of {marked}: finish that one first"
            )
        return True
    if append:
        return False
    tables = await target.tables()
    held = [
        f"{count} {kind}"
        for kind, table, query in HELD
        if table in tables and (count := (await target.fetchall(query))[0][0])
    ]
    if held:
        raise CommandFailed(
            f"the target is not empty ({', '.join(held)}): give --append to add to it"
        )
    return False


def _holds_nul(values: Sequence[Any]) -> bool:
    """Whether a row holds text PostgreSQL cannot (and the server no longer accepts)."""
    return any(isinstance(value, str) and "\0" in value for value in values)


class Copy:
    """One run's copy from a source into a target: what it copied and what it left."""

    def __init__(self, source: Database, target: Database, source_id: str):
        self.source = source
        self.target = target
        self.ledger_mark = LEDGER_MARK.format(source_id)
        self.chats = self.ledger = self.blocks = self.left = 0

    def leave(self, table: str, name: str) -> None:
        """Name a row that is not copied, on stderr: the operator's own output, never a log."""
        print(f"not copied: {table} row {name}: it holds a NUL character", file=sys.stderr)
        self.left += 1

    async def run(self, progress: bool) -> None:
        source, target = self.source, self.target
        source_rows, target_rows = ChatRows(source), ChatRows(target)
        salt = await stored_salt(source)
        if salt is not None:
            theirs = await stored_salt(target)
            if theirs is not None and theirs != salt:
                raise CommandFailed(
                    "the target has an address-hash salt of its own: its blocks would stop"
                    " matching; copy into an empty database"
                )
            await keep_salt(target, salt)
        ledger_end = (await source.fetchall(LEDGER_END))[0][0]
        total = (await source.fetchall("SELECT COUNT(*) FROM chats"))[0][0] + await ledger_size(
            source
        )
        with tqdm(total=total, unit="row", disable=not progress, file=sys.stderr) as bar:
            after = ""
            while page := await source_rows.page_after(after, CHATS_PER_BATCH):
                after = page[-1].chat_id
                bar.update(len(page))
                for row in page:
                    if _holds_nul(dataclasses.astuple(row)):
                        self.leave("chats", repr(row.chat_id))
                kept = [row for row in page if not _holds_nul(dataclasses.astuple(row))]
                await target_rows.copy_rows(kept)
                self.chats += len(kept)
            # Blobs no row names (the source's servers are stopped): the target collects them.
            await target_rows.add_garbage(sorted(await source_rows.known_unnamed()), time.time())
            await self._copy_ledger(ledger_end, bar)
        blocks = await active_blocks(source, utc_now_iso())
        for client, since, until in blocks:
            await save_block(target, client, since, until)
        self.blocks = len(blocks)
        prices = []
        for price in await source.fetchall(PRICES):
            if _holds_nul(price):
                self.leave("prices", repr(price[0]))
            else:
                prices.append(price)
        if prices:
            await target.execute_write_many(KEEP_PRICE, prices)

    async def _copy_ledger(self, ledger_end: int, bar: tqdm[Any]) -> None:
        """The source's ledger up to its last row when the run began, after the last row an
        earlier run copied; each batch commits with how far it got."""
        mark = await self.target.fetchone(READ_MARK, (self.ledger_mark,))
        done_up_to = int(mark[0]) if mark else 0
        while done_up_to < ledger_end and (
            rows := await ledger_page(self.source, done_up_to, LEDGER_PER_BATCH)
        ):
            rows = [row for row in rows if int(row[-1]) <= ledger_end]
            if not rows:
                break
            last_id = int(rows[-1][-1])
            kept = []
            for row in rows:
                if _holds_nul(row):
                    self.leave("completions", f"id {row[-1]}")
                else:
                    kept.append(row[:-1])

            async def store(
                tx: Transaction, kept: list[tuple[Any, ...]] = kept, last_id: int = last_id
            ) -> None:
                await tx.executemany(LEDGER_INSERT, kept)
                await tx.execute(WRITE_MARK, (self.ledger_mark, str(last_id)))

            await self.target.write(store)
            done_up_to = last_id
            self.ledger += len(kept)
            bar.update(len(rows))


def register(commands: Subcommands) -> None:
    command = commands.add_parser(
        "migrate-db",
        help="copy the database into another (SQLite to PostgreSQL)",
        description="Copy chats' rows, the ledger, blocks, settings (the address-hash salt)"
        " and prices from one database into another; the blobs stay in QP_STORAGE. Run it"
        " again to carry on after an interruption.",
    )
    command.set_defaults(run=migrate_db)
    command.add_argument(
        "--from", dest="source", required=True, metavar="URL",
        help="the database to copy: sqlite:///path, a file path, or postgresql://...",
    )  # fmt: skip
    command.add_argument(
        "--to", dest="target", required=True, metavar="URL",
        help="the database to copy into (made if it has no tables yet)",
    )  # fmt: skip
    command.add_argument(
        "--append", action="store_true", help="add to a target that already holds rows"
    )
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
