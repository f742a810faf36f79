"""`python -m qp usage`: completions, tokens and cost from the spend ledger."""

from __future__ import annotations

import argparse

from qp.cli.common import CommandFailed, Subcommands, opened, table
from qp.config import Config
from qp.spend.ledger import usage_totals
from qp.timestamps import parse_iso


async def usage(args: argparse.Namespace, config: Config) -> int:
    since = None
    if args.since:
        since = parse_iso(args.since)
        if since is None:
            raise CommandFailed(f"--since {args.since!r} is not an ISO date")
    async with opened(config) as (db, _, _):
        totals = await usage_totals(db, since, args.app)
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


def register(commands: Subcommands) -> None:
    help = "completions, tokens and cost by app, model and payer"
    command = commands.add_parser("usage", help=help, description=help)
    command.set_defaults(run=usage)
    command.add_argument("--app")
    command.add_argument("--since", metavar="DATE", help="an ISO date or date-time")
