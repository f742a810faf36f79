"""`python -m qp budgets`: each budget in force, what the ledger says it spent this period,
and when it resets (reservations of completions in flight live in the server only)."""

from __future__ import annotations

import argparse
import os

from qp.cli.common import CommandFailed, Subcommands, opened, table
from qp.config import Config
from qp.errors import ConfigError
from qp.policy.loader import load_policy
from qp.spend.budgets import MemoryAccounts, budget_report, open_budget_book


async def budgets(args: argparse.Namespace, config: Config) -> int:
    try:
        policy = load_policy(os.environ, config.config_path)
    except ConfigError as err:
        raise CommandFailed(str(err)) from None
    async with opened(config) as (db, _, _):
        book = await open_budget_book(db, MemoryAccounts())
    shown = budget_report(book, policy)
    if not shown:
        print("no budgets configured (see [budgets] in qp.example.toml)")
        return 0
    print(
        table(
            [
                (
                    budget["scope"],
                    budget.get("app", ""),
                    budget["period"],
                    f"{budget['cap']:.4f}",
                    f"{budget['spent']:.4f}",
                    f"{budget['remaining']:.4f}",
                    budget["resetsAt"],
                )
                for budget in shown
            ],
            ("SCOPE", "APP", "PERIOD", "CAP USD", "SPENT USD", "REMAINING USD", "RESETS AT"),
        )
    )
    return 0


def register(commands: Subcommands) -> None:
    help = "each budget in force: cap, spent this period (from the ledger), when it resets"
    command = commands.add_parser("budgets", help=help, description=help)
    command.set_defaults(run=budgets)
