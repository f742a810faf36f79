"""`python -m qp migrate-db --from sqlite:///data/qp.sqlite3 --to postgresql://...`: copy a
database (chats' rows, the ledger, the blocks in force, the settings with the address-hash
salt, model prices) into another, with a progress bar. The blobs stay where they are:
point the servers at the same QP_STORAGE.

The target must be empty unless `--append` is given (stop the servers of a target being
appended to: a server's write to a chat being copied is overwritten by an older copy only
if that copy's `updated_at` is newer). The copy is resumable: chats are upserted by id, with
the revision that names their blob (the newer `updated_at` wins), and the ledger's progress
is kept in the target beside each batch, so running the same command again after an
interruption carries on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from tqdm import tqdm

from qp.chats.sql import ChatRows
from qp.chats.upgrade import has_old_writes
from qp.cli.common import CommandFailed, Subcommands
from qp.completions.ledger import INSERT as LEDGER_INSERT
from qp.completions.ledger import ledger_page, ledger_size
from qp.config import Config, ConfigError, load_config, mask_url
from qp.protection.blocks import active_blocks, save_block
from qp.protection.client_address import keep_salt, stored_salt
from qp.startup import open_database
from qp.storage.database import Database, Transaction
from qp.timestamps import utc_now_iso

CHATS_PER_BATCH = 500
LEDGER_PER_BATCH = 2000
# Settings rows the copy keeps in the target: which source, how far its ledger got.
SOURCE_MARK = "migrate_db:source"
LEDGER_MARK = "migrate_db:ledger_after"
READ_MARK = "SELECT value FROM settings WHERE name = ?"
WRITE_MARK = """
    INSERT INTO settings (name, value) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
ANY_ROWS = """
    SELECT (SELECT COUNT(*) FROM chats) + (SELECT COUNT(*) FROM completions)
           + (SELECT COUNT(*) FROM blocks)
"""
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
        resuming = await _check_target(target, shown, args.append)
        if await has_old_writes(source):
            raise CommandFailed(
                "the source has chat writes an older version left unfinished: run `python -m"
                " qp check` on it first"
            )
        await target.execute_write(WRITE_MARK, (SOURCE_MARK, shown))
        chats, ledger, blocks = await _copy(source, target, not args.no_progress)
        await target.execute_write(
            "DELETE FROM settings WHERE name IN (?, ?)", (SOURCE_MARK, LEDGER_MARK)
        )
    verb = "carried on copying" if resuming else "copied"
    print(
        f"{verb} {chats} chats, {ledger} ledger rows and {blocks} blocks from {shown}"
        f" to {mask_url(args.target)}"
    )
    return 0


def _config_for(url: str, config: Config) -> Config:
    try:
        found = load_config({"QP_DATA_DIR": str(config.data_dir), "QP_DATABASE": url})
    except ConfigError as err:
        raise CommandFailed(str(err)) from None
    return found


async def _check_target(target: Database, source: str, append: bool) -> bool:
    """Whether this run resumes an interrupted copy of the same source; refuses a target
    that holds anything else, unless appending."""
    mark = await target.fetchone(READ_MARK, (SOURCE_MARK,))
    if mark is not None:
        if mark[0] != source:
            raise CommandFailed(
                f"the target holds an unfinished copy of {mark[0]}: finish that one first"
            )
        return True
    ((rows,),) = await target.fetchall(ANY_ROWS)
    if rows and not append:
        raise CommandFailed(f"the target is not empty ({rows} rows): give --append to add to it")
    return False


async def _copy(source: Database, target: Database, progress: bool) -> tuple[int, int, int]:
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
    total = (await source.fetchall("SELECT COUNT(*) FROM chats"))[0][0] + await ledger_size(source)
    chats = ledger = 0
    with tqdm(total=total, unit="row", disable=not progress, file=sys.stderr) as bar:
        after = ""
        while page := await source_rows.page_after(after, CHATS_PER_BATCH):
            await target_rows.copy_rows(page)
            after = page[-1].chat_id
            chats += len(page)
            bar.update(len(page))
        # Blobs no row names (the source's servers are stopped): the target collects them.
        await target_rows.add_garbage(sorted(await source_rows.known_unnamed()), time.time())
        mark = await target.fetchone(READ_MARK, (LEDGER_MARK,))
        done_up_to = int(mark[0]) if mark else 0
        while rows := await ledger_page(source, done_up_to, LEDGER_PER_BATCH):
            last_id = int(rows[-1][-1])

            async def store(
                tx: Transaction, rows: list[tuple[Any, ...]] = rows, last_id: int = last_id
            ) -> None:
                await tx.executemany(LEDGER_INSERT, [row[:-1] for row in rows])
                await tx.execute(WRITE_MARK, (LEDGER_MARK, str(last_id)))

            await target.write(store)
            done_up_to = last_id
            ledger += len(rows)
            bar.update(len(rows))
    blocks = await active_blocks(source, utc_now_iso())
    for client, since, until in blocks:
        await save_block(target, client, since, until)
    prices = await source.fetchall(PRICES)
    if prices:
        await target.execute_write_many(KEEP_PRICE, prices)
    return chats, ledger, len(blocks)


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
