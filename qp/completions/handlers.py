"""Handlers for POST /api/completion and the spend ledger's GET /api/usage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from qp.appkeys import SHUTTING_DOWN
from qp.bodies import body_allowance, read_json
from qp.completions.relay import UPSTREAM, Payload, relay_completion
from qp.completions.request import (
    check_system_message,
    choose_key,
    parse_completion,
    upstream_body,
)
from qp.config import CONFIG
from qp.errors import ApiError, json_response
from qp.logs import CLIENT_HASH
from qp.metrics import METRICS
from qp.policy.policy import INVALID_APP, POLICY, Policy
from qp.protection.admin import require_admin
from qp.protection.byte_budget import BYTE_BUDGET
from qp.spend.budgets import (
    BUDGETS,
    OPEN_STREAMS,
    Refusal,
    budget_report,
    budget_scopes,
    estimate_cost,
)
from qp.spend.ledger import LEDGER, usage_totals
from qp.spend.lookups import owed_lookup_times
from qp.spend.prices import PRICES
from qp.spend.record import CompletionRecord
from qp.storage.database import DATABASE
from qp.text import is_storable_text
from qp.timestamps import parse_iso, utc_now_iso

log = logging.getLogger("qp.completions")
USAGE_FLUSH_SECONDS = 5.0


async def create_completion(request: web.Request) -> web.StreamResponse:
    policy = request.app[POLICY].current
    config = request.app[CONFIG]
    # The parsed request is charged to the byte budget and let go before the stream starts:
    # a stream may stay open for minutes, holding only what it relays.
    async with request.app[BYTE_BUDGET].hold(
        body_allowance(request, policy.max_completion_body_bytes)
    ):
        completion = parse_completion(
            await read_json(request, policy.max_completion_body_bytes, policy), policy
        )
        key, payer = choose_key(
            completion,
            request.headers.get("x-openrouter-key"),
            policy,
            config.openrouter_api_key,
            config.app_openrouter_keys,
        )
        check_system_message(completion, policy)
        record = CompletionRecord(
            started_at=utc_now_iso(),
            app=completion.app,
            model=completion.model,
            payer=payer,
            client_hash=request[CLIENT_HASH],
        )
        body = upstream_body(completion)
        price = request.app[PRICES].price(policy, completion.model)
        estimate = estimate_cost(policy, price, len(body))
        payload = Payload(body)
        del completion, body
    metrics = request.app[METRICS]
    async with _spending(request, policy, record, estimate) as spending:

        def finished(record: CompletionRecord) -> None:
            _cost(record, estimate)
            spending.cost = record.cost or 0.0
            request.app[LEDGER].add(record)
            metrics.completion_finished(record)

        with metrics.open_streams.track_inprogress():
            return await relay_completion(
                request,
                request.app[UPSTREAM],
                policy,
                payload,
                key,
                record,
                finished,
                request.app[SHUTTING_DOWN],
            )


@dataclass
class Spending:
    """What a completion will be settled at: its estimate unless its record says more."""

    cost: float


@asynccontextmanager
async def _spending(
    request: web.Request, policy: Policy, record: CompletionRecord, estimate: float
) -> AsyncIterator[Spending]:
    """Check 9: the client's open streams, then a reservation in every budget the
    completion falls in (402 naming the first without room). On the way out the
    reservation is settled at `Spending.cost` (the estimate unless the saved record set
    it) and the stream slot let go."""
    spending = Spending(estimate)
    if record.payer == "user":
        yield spending
        return
    client = request[CLIENT_HASH]
    streams = request.app[OPEN_STREAMS]
    if not streams.try_open(client, policy.budget_client_max_streams):
        request.app[METRICS].budget_refusals.labels("client_max_streams").inc()
        raise ApiError(429, "Too many open completions")
    try:
        book = request.app[BUDGETS]
        scopes = budget_scopes(policy, record.payer, record.app, client)
        held = await book.reserve(scopes, estimate, record)
        if isinstance(held, Refusal):
            log.warning("completion refused: the %s budget is used up", held.scope.label)
            request.app[METRICS].budget_refusals.labels(held.scope.label).inc()
            raise ApiError(
                402,
                "Budget exhausted",
                headers={"Retry-After": str(held.retry_after)},
                message=held.message,
            )
        record.reservation_id = held.row_id
        try:
            yield spending
        finally:
            # Shielded: a client that left cancels this task, not the settling.
            await asyncio.shield(book.settle(held, spending.cost))
    finally:
        streams.close(client)


# How a request that went upstream ended before any answer came back, when upstream may
# still bill it: it cannot be looked up (no generation id), so its estimate is its cost.
UNANSWERED = frozenset({"client_left", "shutdown", "timeout"})


def _cost(record: CompletionRecord, estimate: float) -> None:
    """The record's cost and its source: the stream's usage; else, for a stream that began
    or a request left unanswered (upstream may bill either), the estimate, to be replaced
    by the real figure looked up by its generation id when the server or an app paid;
    else (refused or unreachable) nothing was billed."""
    if record.cost is not None:
        record.cost_source = "stream"
    elif record.status == 200 or record.outcome in UNANSWERED:
        record.cost, record.cost_source = estimate, "estimate"
        if record.generation_id is not None and record.payer != "user":
            record.cost_owed_until, record.cost_next_lookup = owed_lookup_times(time.time())


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
