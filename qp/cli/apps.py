"""`python -m qp apps suggest-prefix PROMPT_FILE...`: the longest stable opening the given
system prompts share, for an app's `system_prompt_prefixes`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from qp.cli.common import CommandFailed, Subcommands
from qp.config import Config

# Shorter than this, an opening is easy to guess from the public front end: say so.
SHORT_PREFIX = 40


def suggest_prefix(prompts: list[str]) -> str:
    """The longest opening every prompt starts with (after its leading whitespace, as the
    check reads it), cut back to the end of its last whole word, so that a prompt whose
    next word differs still passes."""
    openings = [prompt.lstrip() for prompt in prompts]
    shared = os.path.commonprefix(openings)  # noqa: RUF071 (characters, not paths: wanted)
    if all(opening == shared for opening in openings):
        return shared.rstrip()
    # Where a prompt goes on past the shared part mid-word, that word is not shared.
    cut = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    return shared[: cut + 1].rstrip() if cut >= 0 else ""


async def suggest(args: argparse.Namespace, config: Config) -> int:
    prompts = []
    for name in args.files:
        try:
            prompts.append(await asyncio.to_thread(Path(name).read_text, encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise CommandFailed(f"cannot read {name}: {err}") from None
    prefix = suggest_prefix(prompts)
    if not prefix:
        raise CommandFailed("the prompts share no opening: no prefix to pin")
    if len(prefix) < SHORT_PREFIX:
        print(f"warning: only {len(prefix)} characters are shared", file=sys.stderr)
    # A JSON string is a TOML basic string: paste the line into the app's section.
    print(f"system_prompt_prefixes = [{json.dumps(prefix, ensure_ascii=False)}]")
    return 0


def register(commands: Subcommands) -> None:
    help = "app policies: suggest-prefix proposes a system_prompt_prefixes entry"
    command = commands.add_parser("apps", help=help, description=help)
    actions = command.add_subparsers(title="actions", required=True, metavar="ACTION")
    about = "the longest stable opening the given prompt files share (an assistant's prompts)"
    prefix = actions.add_parser("suggest-prefix", help=about, description=about)
    prefix.add_argument("files", nargs="+", metavar="PROMPT_FILE")
    prefix.set_defaults(run=suggest)
