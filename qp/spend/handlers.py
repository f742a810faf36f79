"""Handlers of the spend ledger: GET /api/usage, and the flush every report starts with."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from qp.config import CONFIG
from qp.errors import ApiError, json_response
from qp.policy.policy import INVALID_APP, POLICY
from qp.protection.admin import require_admin
from qp.spend.budgets import BUDGETS, budget_report
from qp.spend.ledger import LEDGER, usage_totals
from qp.storage.database import DATABASE
from qp.text import is_storable_text
from qp.timestamps import parse_iso

USAGE_FLUSH_SECONDS = 5.0


async def flush_ledger(app: web.Application) -> None:
    """Write the ledger rows still queued, so a report includes every completion so far
    (unless the database keeps refusing them)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(USAGE_FLUSH_SECONDS):
            await app[LEDGER].flush()


async def usage_report(request: web.Request) -> web.Response:
    """Totals by app, model and payer, optionally for one app and from a date on."""
    require_admin(request, request.app[CONFIG].admin_key)
    app = request.query.get("app") or None
    if app is not None and not is_storable_text(app):
        raise ApiError(400, INVALID_APP)
    since = None
    if request.query.get("since"):
        since = parse_iso(request.query["since"])
        if since is None:
            raise ApiError(400, "Invalid since parameter")
    await flush_ledger(request.app)
    totals = await usage_totals(request.app[DATABASE], since, app)
    rows: list[dict[str, Any]] = [
        {
            "app": total.app,
            "model": total.model,
            "payer": total.payer,
            "completions": total.completions,
            "promptTokens": total.prompt_tokens,
            "completionTokens": total.completion_tokens,
            "cost": total.cost,
            "clientLeft": total.client_left,
            "costSource": {
                "stream": total.from_stream,
                "generation": total.from_generation,
                "estimate": total.from_estimate,
            },
        }
        for total in totals
    ]
    overall = {
        name: sum(row[name] for row in rows)
        for name in ("completions", "promptTokens", "completionTokens", "cost", "clientLeft")
    }
    await request.app[BUDGETS].refresh()
    budgets = budget_report(request.app[BUDGETS], request.app[POLICY].current)
    return json_response(
        {"since": since, "app": app, "totals": rows, "overall": overall, "budgets": budgets}
    )
