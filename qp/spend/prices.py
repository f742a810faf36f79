"""Model prices: OpenRouter's model list (`GET {base}/api/v1/models`: `data[].id`,
`data[].pricing.prompt` and `.completion`, USD per token as strings), fetched at start-up
and daily and kept in SQLite, so a restart without network still has them. The policy's
`[prices]` table wins over them. Used only for estimates (reservations, and the cost of a
stream nothing better is known of)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from qp.bodies import read_at_most
from qp.errors import StorageUnavailable
from qp.policy.policy import Policy
from qp.storage.database import Database, Transaction
from qp.timestamps import utc_now_iso

log = logging.getLogger("qp.spend.prices")

REFRESH_SECONDS = 24 * 3600
RETRY_SECONDS = 3600
REQUEST_TIMEOUT = 30.0
MAX_LIST_BYTES = 16 * 1024 * 1024  # the list is about 1 MB; more is not a model list
MAX_MODELS = 20_000

ALL = "SELECT model, prompt, completion FROM prices"
CLEAR = "DELETE FROM prices"
INSERT = "INSERT INTO prices (model, prompt, completion, fetched_at) VALUES (?, ?, ?, ?)"

Prices = dict[str, tuple[float, float]]


class PriceList:
    """The fetched prices in force: read from SQLite at start, replaced on each refresh."""

    def __init__(self, db: Database):
        self._db = db
        self.fetched: Prices = {}

    async def load(self) -> None:
        rows = await self._db.fetchall(ALL)
        self.fetched = {model: (prompt, completion) for model, prompt, completion in rows}

    def price(self, policy: Policy, model: str) -> tuple[float, float] | None:
        return policy.price_table.get(model) or self.fetched.get(model)

    async def run(self, session: aiohttp.ClientSession, policy: Callable[[], Policy]) -> None:
        """Refresh now and daily; an hour after a failure (the prices kept stay in use)."""
        while True:
            try:
                await self.refresh(session, policy())
                wait = REFRESH_SECONDS
            except (aiohttp.ClientError, TimeoutError, ValueError, StorageUnavailable) as err:
                log.warning("model prices not refreshed (the last ones stay in use): %s", err)
                wait = RETRY_SECONDS
            await asyncio.sleep(wait)

    async def refresh(self, session: aiohttp.ClientSession, policy: Policy) -> None:
        async with (
            asyncio.timeout(REQUEST_TIMEOUT),
            session.get(policy.api_url("models"), allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise ValueError(f"the model list answered {response.status}")
            data = await read_at_most(response.content, MAX_LIST_BYTES + 1)
        if len(data) > MAX_LIST_BYTES:
            raise ValueError("the model list is too large")
        try:
            prices = parse_model_list(orjson.loads(data))
        except orjson.JSONDecodeError:
            raise ValueError("the model list is not JSON") from None
        if not prices:
            raise ValueError("the model list holds no prices")
        await self._store(prices)
        self.fetched = prices
        log.info("model prices refreshed: %d models", len(prices))

    async def _store(self, prices: Prices) -> None:
        now = utc_now_iso()

        async def store(tx: Transaction) -> None:
            await tx.execute(CLEAR)
            await tx.executemany(INSERT, [(m, p, c, now) for m, (p, c) in prices.items()])

        await self._db.write(store)


def parse_model_list(body: Any) -> Prices:
    """`{"data": [{"id", "pricing": {"prompt", "completion"}}]}` to prices; entries that
    are not that shape, or not finite non-negative numbers, are left out."""
    models = body.get("data") if isinstance(body, dict) else None
    prices: Prices = {}
    for model in models[:MAX_MODELS] if isinstance(models, list) else []:
        pricing = model.get("pricing") if isinstance(model, dict) else None
        model_id = model.get("id") if isinstance(model, dict) else None
        if not isinstance(model_id, str) or not isinstance(pricing, dict) or len(model_id) > 200:
            continue
        prompt, completion = _usd(pricing.get("prompt")), _usd(pricing.get("completion"))
        if prompt is not None and completion is not None:
            prices[model_id] = (prompt, completion)
    return prices


def _usd(value: Any) -> float | None:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and 0 <= number < 1 else None


# Model prices fetched from OpenRouter's model list (the policy's [prices] win).
PRICES = web.AppKey("prices", PriceList)
