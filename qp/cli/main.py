"""The operators' command line: `python -m qp COMMAND ...`, one module per command family.

It works on the same database and blob store as the server (the same environment
variables), and can run beside it: the server notices changes to the database within a
second.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys

from qp.cli import apps, blocks, budgets, chats, check, copy_blobs, import_d1, migrate_db, usage
from qp.cli.common import PROGRAM, CommandFailed
from qp.cli.import_d1 import DumpRefused
from qp.config import ConfigError, load_config
from qp.errors import StorageUnavailable, UnstorableValue
from qp.startup import StartupError
from qp.storage.migrations import SchemaTooNew

FAMILIES = (chats, usage, budgets, blocks, apps, check, import_d1, copy_blobs, migrate_db)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="qp-server's operator tools. They use the server's environment"
        " (QP_DATA_DIR, QP_DATABASE, QP_STORAGE, ...).",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config()
        return int(asyncio.run(args.run(args, config)))
    except (
        CommandFailed,
        ConfigError,
        StartupError,
        DumpRefused,
        SchemaTooNew,
        StorageUnavailable,
        UnstorableValue,
        sqlite3.Error,
    ) as err:
        print(f"{PROGRAM}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
