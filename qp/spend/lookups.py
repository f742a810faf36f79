"""Cost lookups: a server- or app-paid stream that ended without usage in it (the client
left, upstream went idle or died, a shutdown cut it) is first costed at its estimate; its
real cost is then asked of OpenRouter's generation endpoint by its generation id, with the
key that paid, retried with backoff while it is not yet there (404) for up to
LOOKUP_WINDOW seconds. What is still owed is in the ledger's rows (cost_next_lookup), so a
restart carries on where the last process stopped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson

from qp.bodies import read_at_most
from qp.config import app_key_variable
from qp.errors import StorageUnavailable
from qp.metrics import Metrics
from qp.policy.policy import Policy
from qp.spend.budgets import BudgetBook, budget_scopes
from qp.spend.ledger import (
    OwedLookup,
    claim_lookup,
    lookup_found,
    lookup_given_up,
    lookup_later,
    lookups_due,
)
from qp.storage.database import Database
from qp.timestamps import epoch_seconds, format_epoch

log = logging.getLogger("qp.spend.lookups")

LOOKUP_WINDOW = 600.0  # seconds after a stream ends that its cost is still asked for
FIRST_LOOKUP_DELAY = 1.0
MAX_BACKOFF = 60.0
POLL_SECONDS = 0.5
REQUEST_TIMEOUT = 10.0
# A lookup taken by a process that dies meanwhile is due again after this long.
CLAIM_SECONDS = 3 * REQUEST_TIMEOUT
MAX_ANSWER_BYTES = 64 * 1024  # a generation's record is under 2 KiB
MAX_COST = 1e6  # a figure above this from upstream is not believed


def owed_lookup_times(now: float) -> tuple[str, str]:
    """(owed until, first lookup) for a stream that ended at `now`."""
    return format_epoch(now + LOOKUP_WINDOW), format_epoch(now + FIRST_LOOKUP_DELAY)


class CostLookups:
    """The loop that settles owed costs; one per process."""

    def __init__(
        self,
        db: Database,
        session: aiohttp.ClientSession,
        policy: Callable[[], Policy],
        book: BudgetBook,
        server_key: str | None,
        app_keys: Mapping[str, str],
        metrics: Metrics,
    ):
        self._db = db
        self._session = session
        self._policy = policy
        self._book = book
        self._server_key = server_key
        self._app_keys = app_keys
        self._metrics = metrics

    async def run(self) -> None:
        while True:
            try:
                due = await lookups_due(self._db, format_epoch(time.time()))
                for owed in due:
                    await self._look_up(owed)
            except StorageUnavailable as err:
                log.warning("cost lookups wait for the database: %s", err)
            await asyncio.sleep(POLL_SECONDS)

    def _key(self, owed: OwedLookup) -> str | None:
        if owed.payer == "app" and owed.app is not None:
            return self._app_keys.get(app_key_variable(owed.app))
        return self._server_key

    async def _look_up(self, owed: OwedLookup) -> None:
        now = time.time()
        if not await claim_lookup(self._db, owed, format_epoch(now + CLAIM_SECONDS)):
            return  # another process sharing the database took it
        key = self._key(owed)
        found = await self._ask(owed.generation_id, key) if key else None
        if found is not None:
            cost, prompt_tokens, completion_tokens = found
            await lookup_found(self._db, owed.row_id, cost, prompt_tokens, completion_tokens)
            scopes = budget_scopes(self._policy(), owed.payer, owed.app, owed.client_hash or "")
            await self._book.adjust(scopes, cost - owed.estimate, epoch_seconds(owed.started_at))
            self._metrics.cost_settled(owed.app, owed.model, owed.payer, cost)
            return
        if key is None or now >= epoch_seconds(owed.owed_until):
            log.warning("a completion's cost could not be looked up; its estimate stays")
            await lookup_given_up(self._db, owed.row_id)
            self._metrics.cost_settled(owed.app, owed.model, owed.payer, owed.estimate)
            return
        waited = now - (epoch_seconds(owed.owed_until) - LOOKUP_WINDOW)
        backoff = min(MAX_BACKOFF, max(FIRST_LOOKUP_DELAY, waited / 2))
        await lookup_later(self._db, owed.row_id, format_epoch(now + backoff))

    async def _ask(
        self, generation_id: str, key: str
    ) -> tuple[float, int | None, int | None] | None:
        """(cost, prompt tokens, completion tokens), or None when not (yet) known."""
        url = self._policy().generation_url.with_query(id=generation_id)
        try:
            async with (
                asyncio.timeout(REQUEST_TIMEOUT),
                self._session.get(
                    url, headers={"Authorization": f"Bearer {key}"}, allow_redirects=False
                ) as response,
            ):
                if response.status != 200:
                    return None
                body = orjson.loads(await read_at_most(response.content, MAX_ANSWER_BYTES))
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
            return None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            return None
        cost = _number(data.get("total_cost"))
        if cost is None or cost > MAX_COST:
            return None
        return cost, _tokens(data.get("tokens_prompt")), _tokens(data.get("tokens_completion"))


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number >= 0:
            return number
    return None


def _tokens(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None
