"""`python -m qp blocks list|lift`: clients blocked for rate-limit violations."""

from __future__ import annotations

import argparse
from contextlib import AsyncExitStack

from qp.cli.common import CommandFailed, Subcommands, open_all, opened, table
from qp.config import Config
from qp.protection.blocks import active_blocks, lift_block, open_rate_limiter
from qp.timestamps import utc_now_iso


async def blocks_list(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as (db, _, _):
        blocks = await active_blocks(db, utc_now_iso())
    print(table(blocks, ("CLIENT HASH", "BLOCKED AT", "BLOCKED UNTIL")))
    return 0


async def blocks_lift(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        db, processes, _, _ = await open_all(config, stack)
        counts = processes.rate_counts(config.rate_limit_clients)
        limiter = await open_rate_limiter(db, counts, processes.peers)
        if not await lift_block(db, limiter, args.client_hash):
            raise CommandFailed(f"no block for {args.client_hash}")
    print(f"lifted the block on {args.client_hash} (a running server follows within a second)")
    return 0


def register(commands: Subcommands) -> None:
    blocks = commands.add_parser("blocks", help="clients blocked for rate-limit violations")
    sub = blocks.add_subparsers(title="commands", required=True, metavar="COMMAND")
    command = sub.add_parser("list", help="the blocks in force", description="the blocks in force")
    command.set_defaults(run=blocks_list)
    command = sub.add_parser("lift", help="lift one block", description="lift one block")
    command.set_defaults(run=blocks_lift)
    command.add_argument("client_hash", metavar="HASH")
