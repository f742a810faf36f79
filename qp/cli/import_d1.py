"""`python -m qp import-d1 FILE`: load the `chats` rows of a `wrangler d1 export` dump.

The dump is read statement by statement; only the statements such a dump holds for the
chats table are recognised (its PRAGMA, CREATE TABLE, CREATE INDEX and INSERT lines), and
anything else refuses the whole file before a row is written. INSERT values are parsed by
SQLite itself, in a scratch in-memory database. Rows whose chat id the server would refuse
are reported, not imported. Importing again changes nothing: a row already stored is only
replaced by a newer one (later updated_at).
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qp.chats.model import ChatRow, is_valid_chat_id
from qp.chats.sql import ChatRows
from qp.cli.common import CommandFailed, Subcommands, opened
from qp.config import Config
from qp.timestamps import parse_iso

_RECOGNISED = (
    ("skip", re.compile(r"PRAGMA\s+defer_foreign_keys\s*=\s*\w+\s*;", re.I)),
    (
        "skip",
        re.compile(r'CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?"?chats"?\s*\(.*\)\s*;', re.I | re.S),
    ),
    (
        "skip",
        re.compile(
            r'CREATE\s+INDEX\s+(IF\s+NOT\s+EXISTS\s+)?"?\w+"?\s+ON\s+"?chats"?\s*\([^;]*\)\s*;',
            re.I,
        ),
    ),
    ("insert", re.compile(r'INSERT\s+INTO\s+"?chats"?\s+VALUES\s*\(.*\)\s*;', re.I | re.S)),
)
_SCRATCH_TABLE = (
    "CREATE TABLE chats (chat_id, app, model, prompt_tokens, completion_tokens,"
    " estimated_cost, created_at, updated_at)"
)


class DumpRefused(Exception):
    """The dump holds something this importer does not recognise; nothing was imported."""


@dataclass
class ParsedDump:
    rows: list[ChatRow] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (chat id, why)


def parse_dump(path: Path) -> ParsedDump:
    scratch = sqlite3.connect(":memory:")
    scratch.execute(_SCRATCH_TABLE)
    statement, first_line = "", 0
    with path.open(encoding="utf-8") as dump:
        for number, line in enumerate(dump, 1):
            if not statement and not line.strip():
                continue
            if not statement:
                first_line = number
            statement += line
            if sqlite3.complete_statement(statement):
                _load_statement(scratch, statement.strip(), first_line)
                statement = ""
    if statement.strip():
        raise DumpRefused(f"line {first_line}: the file ends inside a statement")
    parsed = ParsedDump()
    for values in scratch.execute("SELECT * FROM chats"):
        why = _invalid(values)
        if why:
            parsed.refused.append((str(values[0]), why))
        else:
            parsed.rows.append(_row(values))
    return parsed


def _load_statement(scratch: sqlite3.Connection, statement: str, line: int) -> None:
    for action, pattern in _RECOGNISED:
        if pattern.fullmatch(statement):
            if action == "insert":
                try:
                    scratch.execute(statement)
                except (sqlite3.Error, sqlite3.Warning) as err:
                    raise DumpRefused(f"line {line}: cannot read this INSERT: {err}") from None
            return
    shown = statement.splitlines()[0][:80]
    raise DumpRefused(f"line {line}: not a statement of a chats export: {shown}")


def _invalid(values: tuple[Any, ...]) -> str | None:
    chat_id, app, model, prompt, completion, cost, created, updated = values
    if not isinstance(chat_id, str) or not is_valid_chat_id(chat_id):
        return "invalid chat id"
    if not isinstance(app, str) or not isinstance(model, str):
        return "app or model is not text"
    if not all(isinstance(n, int | float) for n in (prompt, completion, cost)):
        return "usage is not numbers"
    if not all(isinstance(t, str) and parse_iso(t) for t in (created, updated)):
        return "timestamps are not ISO dates"
    return None


def _row(values: tuple[Any, ...]) -> ChatRow:
    """A row `_invalid` passed: its timestamps parse."""
    chat_id, app, model, prompt, completion, cost, created, updated = values
    created_at, updated_at = parse_iso(created), parse_iso(updated)
    assert created_at is not None and updated_at is not None
    return ChatRow(chat_id, app, model, prompt, completion, cost, created_at, updated_at)


async def import_d1(args: argparse.Namespace, config: Config) -> int:
    try:
        dump = parse_dump(args.file)
    except OSError as err:
        raise CommandFailed(f"cannot read {args.file}: {err.strerror}") from None
    for chat_id, why in dump.refused:
        print(f"not imported: {chat_id!r}: {why}", file=sys.stderr)
    async with opened(config) as (db, _, _):
        added, replaced, unchanged = await ChatRows(db).import_rows(dump.rows)
    print(
        f"{added} chats added, {replaced} replaced by newer, {unchanged} unchanged,"
        f" {len(dump.refused)} refused"
    )
    print("now copy their messages: python -m qp copy-blobs --from ... --to ...", file=sys.stderr)
    return 0


def register(commands: Subcommands) -> None:
    help = "load the chats rows of a `wrangler d1 export` dump"
    command = commands.add_parser("import-d1", help=help, description=help)
    command.set_defaults(run=import_d1)
    command.add_argument("file", type=Path, metavar="FILE")
