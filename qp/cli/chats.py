"""`python -m qp chats list|show|delete`."""

from __future__ import annotations

import argparse
import sys

import orjson

from qp.chats.model import is_valid_chat_id
from qp.chats.sql import ChatRows
from qp.cli.common import CommandFailed, Subcommands, opened, table
from qp.config import Config


async def chats_list(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (db, _, _):
        rows = await ChatRows(db).newest(args.app, args.limit)
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


def register(commands: Subcommands) -> None:
    chats = commands.add_parser("chats", help="list, show or delete chats")
    sub = chats.add_subparsers(title="commands", required=True, metavar="COMMAND")
    command = sub.add_parser("list", help="an app's chats, newest first")
    command.set_defaults(run=chats_list)
    command.add_argument("--app", required=True)
    command.add_argument("--limit", type=int, default=1000)
    command = sub.add_parser("show", help="one chat as GET /api/chats/ID answers it")
    command.set_defaults(run=chats_show)
    command.add_argument("chat_id", metavar="ID")
    command = sub.add_parser("delete", help="remove a chat's row and messages")
    command.set_defaults(run=chats_delete)
    command.add_argument("chat_id", metavar="ID")
