"""Handlers for POST /api/completion and the spend ledger's GET /api/usage."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from qp.appkeys import (
    BYTE_BUDGET,
    CONFIG,
    DATABASE,
    LEDGER,
    METRICS,
    POLICY,
    SHUTTING_DOWN,
    UPSTREAM,
)
from qp.bodies import body_allowance, read_json
from qp.completions.ledger import usage_totals
from qp.completions.relay import Payload, relay_completion
from qp.completions.request import (
    check_system_message,
    choose_key,
    parse_completion,
    upstream_body,
)
from qp.completions.usage import CompletionRecord
from qp.errors import ApiError, json_response
from qp.protection.admin import require_admin
from qp.timestamps import parse_iso, utc_now_iso

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
            started_at=utc_now_iso(), app=completion.app, model=completion.model, payer=payer
        )
        payload = Payload(upstream_body(completion))
        del completion
    metrics = request.app[METRICS]

    def finished(record: CompletionRecord) -> None:
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


async def usage_report(request: web.Request) -> web.Response:
    """Totals by app, model and payer, optionally for one app and from a date on."""
    require_admin(request, request.app[CONFIG].admin_key)
    app = request.query.get("app") or None
    since = None
    if request.query.get("since"):
        since = parse_iso(request.query["since"])
        if since is None:
            raise ApiError(400, "Invalid since parameter")
    # The report includes every completion so far, unless the database keeps refusing them.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(USAGE_FLUSH_SECONDS):
            await request.app[LEDGER].flush()
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
        }
        for total in totals
    ]
    overall = {
        name: sum(row[name] for row in rows)
        for name in ("completions", "promptTokens", "completionTokens", "cost", "clientLeft")
    }
    return json_response({"since": since, "app": app, "totals": rows, "overall": overall})
