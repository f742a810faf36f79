"""The admin JSON routes the operator's page reads: spend, apps, blocks, and an overview.
Every one needs `x-admin-key`; none is rate limited."""

from __future__ import annotations

import importlib.metadata
import re
from datetime import UTC, datetime, timedelta

from aiohttp import web

from qp.appkeys import CLOCK, STARTED_AT
from qp.chats.store import CHAT_STORE
from qp.completions.breakers import BREAKERS
from qp.config import CONFIG, describe
from qp.errors import ApiError, json_response
from qp.metrics import METRICS
from qp.ops.health import health_checks
from qp.policy.policy import POLICY
from qp.protection import blocks as client_blocks
from qp.protection.admin import require_admin
from qp.protection.rate_limits import RATE_LIMITER
from qp.spend.budgets import BUDGETS, budget_report
from qp.spend.handlers import flush_ledger
from qp.spend.ledger import spent_since
from qp.spend.reports import (
    cache_savings,
    cost_by_source,
    cost_per_day,
    cost_since,
    outcomes_per_hour,
)
from qp.storage.database import DATABASE
from qp.timestamps import format_epoch, format_iso

MAX_DAYS = 366
# Apps listed at most: anyone may name a new app when no allow-list (QP_APPS) is set.
MAX_APPS = 1000
HOURS_SHOWN = 48
# How the page groups the ledger's outcomes.
OUTCOME_GROUPS = {
    "completed": "completed",
    "cached": "completed",
    "client_left": "clientLeft",
    "upstream_error": "upstreamError",
    "upstream_died": "upstreamError",
    "upstream_idle": "upstreamError",
    "unreachable": "upstreamError",
    "timeout": "timeout",
}
OUTCOME_NAMES = ("completed", "clientLeft", "upstreamError", "timeout", "other")
_CLIENT_HASH = re.compile(r"[0-9a-f]{64}")
# Blocks in one answer of /api/admin/blocks; `next` names the page after it.
BLOCKS_PER_PAGE = 100
_DAYS = re.compile(r"[0-9]{1,3}")


def _version() -> str:
    try:
        return importlib.metadata.version("qp-server")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def overview(request: web.Request) -> web.Response:
    """Health, version, uptime, open streams, storage, and the settings (secrets masked)."""
    app = request.app
    config = app[CONFIG]
    require_admin(request, config.admin_key)
    checks = await health_checks(app)
    now = app[CLOCK]()
    started = app[STARTED_AT]
    open_streams = app[METRICS].registry.get_sample_value("qp_open_streams") or 0
    return json_response(
        {
            "status": "ok" if all(state == "ok" for state in checks.values()) else "unavailable",
            "checks": checks,
            "version": _version(),
            "startedAt": format_epoch(started),
            "uptimeSeconds": max(0, round(now - started)),
            "openStreams": int(open_streams),
            "openBreakers": app[BREAKERS].open_models(app[POLICY].current),
            "database": "postgresql" if config.postgres_url else "sqlite",
            "storage": "s3" if config.storage_url.startswith("s3://") else "file",
            "settings": describe(config, app[POLICY].current),
        }
    )


async def spend(request: web.Request) -> web.Response:
    """Cost per UTC day for the last `days` days (today included) by app or by model, the
    totals of today and this month, cost by source, completions per hour for the last 48
    hours by how they ended, and the budgets in force; of what the server's and the apps'
    keys paid for, or with `payer=all` of every completion."""
    app = request.app
    require_admin(request, app[CONFIG].admin_key)
    days = _days(request.query.get("days", "30"))
    by = request.query.get("by", "app")
    if by not in ("app", "model"):
        raise ApiError(400, "Invalid by parameter")
    paid_by = request.query.get("payer", "operator")
    if paid_by not in ("operator", "all"):
        raise ApiError(400, "Invalid payer parameter")
    everyone = paid_by == "all"
    now = datetime.fromtimestamp(app[CLOCK](), UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = hour - timedelta(hours=HOURS_SHOWN - 1)
    await flush_ledger(app)
    db = app[DATABASE]

    per_day: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for row in await cost_per_day(db, format_iso(first), by, everyone):
        per_day.setdefault(row.day, {})[row.name] = row.cost
        totals[row.name] = totals.get(row.name, 0.0) + row.cost
    names = sorted(totals, key=lambda name: (-totals[name], name))
    series = []
    for n in range(days):
        day = (first + timedelta(days=n)).strftime("%Y-%m-%d")
        costs = per_day.get(day, {})
        series.append({"day": day, "costs": costs, "total": sum(costs.values(), 0.0)})

    outcomes = await outcomes_per_hour(db, format_iso(first_hour), everyone)
    hourly = []
    for n in range(HOURS_SHOWN):
        start = first_hour + timedelta(hours=n)
        counts = dict.fromkeys(OUTCOME_NAMES, 0)
        for outcome, count in outcomes.get(start.strftime("%Y-%m-%dT%H"), {}).items():
            counts[OUTCOME_GROUPS.get(outcome, "other")] += count
        hourly.append({"hour": format_iso(start), **counts})

    savings = await cache_savings(db, format_iso(first))
    await app[BUDGETS].refresh()
    budgets = budget_report(app[BUDGETS], app[POLICY].current)
    return json_response(
        {
            "days": days,
            "by": by,
            "payer": paid_by,
            "from": series[0]["day"],
            "to": series[-1]["day"],
            "names": names,
            "series": series,
            "total": sum(totals.values(), 0.0),
            "today": await cost_since(db, format_iso(today), everyone),
            "month": await cost_since(db, format_iso(today.replace(day=1)), everyone),
            "costSource": await cost_by_source(db, format_iso(first), everyone),
            "hourly": hourly,
            "budgets": budgets,
            "cache": {
                "hits": sum(saving.hits for saving in savings),
                "saved": sum((saving.saved for saving in savings), 0.0),
                "apps": [
                    {
                        "app": saving.app,
                        "hits": saving.hits,
                        "completions": saving.completions,
                        "hitRate": saving.hits / saving.completions,
                        "saved": saving.saved,
                    }
                    for saving in savings
                ],
            },
        }
    )


async def policies(request: web.Request) -> web.Response:
    """Each app's policy in force ([apps."name"], "*" every app not named), what the
    server's and its own key spent on it today against its daily budget, and this
    process's refusals by app and reason (every app refused, with a section or not)."""
    app = request.app
    require_admin(request, app[CONFIG].admin_key)
    policy = app[POLICY].current
    now = datetime.fromtimestamp(app[CLOCK](), UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    await flush_ledger(app)
    spent = await spent_since(app[DATABASE], format_iso(today), format_iso(today.replace(day=1)))
    refusals = app[METRICS].app_refusal_counts()
    return json_response(
        {
            "requireListed": policy.app_rules.require_listed,
            "apps": [
                {
                    "app": name,
                    "models": _listed(rules.models),
                    "maxCompletionTokens": rules.max_completion_tokens,
                    "maxMessages": rules.max_messages,
                    "maxRequestChars": rules.max_request_chars,
                    "systemPromptPrefixes": _listed(rules.system_prompt_prefixes),
                    "spentToday": 0.0 if name == "*" else spent.apps_day.get(name, 0.0),
                    "dailyBudget": policy.app_budget(name),
                }
                for name, rules in policy.app_rules.apps
            ],
            "refusals": [
                {"app": name, "reason": reason, "refusals": count}
                for name, reasons in sorted(refusals.items())
                for reason, count in sorted(reasons.items())
            ],
        }
    )


def _listed(items: tuple[str, ...] | None) -> list[str] | None:
    return list(items) if items is not None else None


def _days(text: str) -> int:
    if not _DAYS.fullmatch(text) or not 1 <= int(text) <= MAX_DAYS:
        raise ApiError(400, "Invalid days parameter")
    return int(text)


async def apps(request: web.Request) -> web.Response:
    """The apps with chats (the MAX_APPS with the most): how many, and when the latest was
    updated."""
    require_admin(request, request.app[CONFIG].admin_key)
    found = await request.app[CHAT_STORE].apps(MAX_APPS)
    return json_response(
        {"apps": [{"app": app, "chats": count, "updatedAt": at} for app, count, at in found]}
    )


async def blocks(request: web.Request) -> web.Response:
    """A page of the blocks in force (BLOCKS_PER_PAGE, by client hash from `after`), the
    cursor of the next, and rate-limit refusals per hour for the last 48 hours."""
    app = request.app
    require_admin(request, app[CONFIG].admin_key)
    after = request.query.get("after", "")
    if after and not _CLIENT_HASH.fullmatch(after):
        raise ApiError(400, "Invalid after parameter")
    found, following = await client_blocks.blocks_page(
        app[DATABASE], format_epoch(app[CLOCK]()), after, BLOCKS_PER_PAGE
    )
    refusals = app[RATE_LIMITER].refusals_per_hour.last(HOURS_SHOWN)
    return json_response(
        {
            "blocks": [
                {"client": client, "since": since, "until": until} for client, since, until in found
            ],
            "next": following,
            "refusals": [
                {"hour": format_epoch(hour), "refusals": count} for hour, count in refusals
            ],
        }
    )


async def lift_block(request: web.Request) -> web.Response:
    """Lift one client's block: it is served again at once, with fresh counts."""
    app = request.app
    require_admin(request, app[CONFIG].admin_key)
    client = request.match_info["client"]
    if not _CLIENT_HASH.fullmatch(client) or not await client_blocks.lift_block(
        app[DATABASE], app[RATE_LIMITER], client
    ):
        raise ApiError(404, "Block not found")
    return json_response({"success": True})
