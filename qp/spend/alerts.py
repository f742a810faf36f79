"""Spend alerts: a JSON POST to QP_ALERT_WEBHOOK_URL, and a warning in the log, when what
the server's or an app's budget has spent passes 50 %, 80 % and 100 % of its cap, once per
threshold per period. The body's `text` field is what Slack and Mattermost incoming
webhooks show as is. Sent from a queue by a task of its own, retried with backoff: a
receiver that is slow or down never delays a request."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from qp.spend.budgets import Scope
from qp.timestamps import format_epoch

log = logging.getLogger("qp.spend.alerts")

MAX_QUEUED = 1000
ATTEMPTS = 5
FIRST_RETRY_SECONDS = 1.0
REQUEST_TIMEOUT = 10.0


class Alerts:
    """Queues alerts and sends them one by one to the webhook, if one is configured."""

    def __init__(self, webhook_url: str | None):
        self._url = webhook_url
        self._queue: asyncio.Queue[dict[str, object]] = asyncio.Queue(MAX_QUEUED)

    def budget_passed(
        self, scope: Scope, period_start: float, threshold: int, spent: float, cap: float
    ) -> None:
        what = scope.describe()
        day = format_epoch(period_start)[:10]
        text = (
            f"qp-server: {what} has passed {threshold} % of its cap: "
            f"${spent:.4f} of ${cap:.4f} spent in the {scope.period} from {day}"
        )
        log.warning("%s", text)
        if self._url is None:
            return
        alert: dict[str, object] = {
            "text": text,
            "scope": scope.named,
            "period": scope.period,
            "spent": round(spent, 6),
            "cap": cap,
            "percent": threshold,
        }
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            log.error("spend alert dropped: %d alerts are already waiting", MAX_QUEUED)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            alert = await self._queue.get()
            await self._send(session, alert)

    async def _send(self, session: aiohttp.ClientSession, alert: dict[str, object]) -> None:
        assert self._url is not None
        wait = FIRST_RETRY_SECONDS
        for attempt in range(ATTEMPTS):
            try:
                async with (
                    asyncio.timeout(REQUEST_TIMEOUT),
                    session.post(self._url, json=alert, allow_redirects=False) as response,
                ):
                    if 200 <= response.status < 300:
                        return
                    reason = f"status {response.status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                reason = type(err).__name__
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(wait)
                wait *= 2
        log.error("spend alert not delivered after %d attempts (%s)", ATTEMPTS, reason)


# Spend alerts waiting to be POSTed to QP_ALERT_WEBHOOK_URL.
ALERTS = web.AppKey("alerts", Alerts)
