"""One completion's spending: a stream slot and a reservation in every budget it falls in
while it runs; once it ends, its cost, its ledger row, its metrics and its settlement.

The completion relay hands over one finished record; everything money does with it
happens here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from qp.errors import ApiError
from qp.metrics import Metrics
from qp.policy.policy import Policy
from qp.spend.budgets import BudgetBook, OpenStreams, Refusal, budget_scopes
from qp.spend.lookups import owed_lookup_times
from qp.spend.record import CompletionRecord
from qp.storage.batches import BatchWriter

log = logging.getLogger("qp.spend")

# How a request that went upstream ended before any answer came back, when upstream may
# still bill it: it cannot be looked up (no generation id), so its estimate is its cost.
UNANSWERED = frozenset({"client_left", "shutdown", "timeout"})
UPSTREAM_FAILURES = frozenset(
    {"timeout", "unreachable", "upstream_error", "upstream_idle", "upstream_died"}
)


class Spend:
    """What completions spend: the budgets, the open-stream slots, the ledger."""

    def __init__(
        self,
        budgets: BudgetBook,
        streams: OpenStreams,
        ledger: BatchWriter[CompletionRecord],
        metrics: Metrics,
    ):
        self._budgets = budgets
        self._streams = streams
        self._ledger = ledger
        self._metrics = metrics

    @asynccontextmanager
    async def completion(
        self, policy: Policy, record: CompletionRecord, estimate: float
    ) -> AsyncIterator[None]:
        """Contract check 9 on the way in: the client's open streams, then a reservation in
        every budget the completion falls in (402 naming the first without room). On the
        way out, however the block ends, the record is finished and written, and the
        reservation settled at its cost."""
        if record.payer == "user":
            try:
                yield
            finally:
                self._finish(record, estimate)
            return
        client = record.client_hash or ""
        if not self._streams.try_open(client, policy.budget_client_max_streams):
            self._metrics.budget_refusals.labels("client_max_streams").inc()
            raise ApiError(429, "Too many open completions")
        try:
            scopes = budget_scopes(policy, record.payer, record.app, client)
            held = await self._budgets.reserve(scopes, estimate, record)
            if isinstance(held, Refusal):
                log.warning("completion refused: the %s budget is used up", held.scope.label)
                self._metrics.budget_refusals.labels(held.scope.label).inc()
                raise ApiError(
                    402,
                    "Budget exhausted",
                    headers={"Retry-After": str(held.retry_after)},
                    message=held.message,
                )
            record.reservation_id = held.row_id
            cost = estimate
            try:
                yield
            finally:
                cost = self._finish(record, estimate)
                # Shielded: a client that left cancels this task, not the settling.
                await asyncio.shield(self._budgets.settle(held, cost))
        finally:
            self._streams.close(client)

    def served_from_cache(self, record: CompletionRecord) -> None:
        """A completion answered from the response cache: nothing reserved, nothing billed,
        nothing to look up; its row costs 0 and names what it saved."""
        record.cost, record.cost_source = 0.0, "cache"
        self._ledger.add(record)

    def nothing_billed(self, record: CompletionRecord) -> None:
        """A completion that never went upstream of its own and got no answer (a follower of
        a response-cache flight that failed, or that it left): its row, costing nothing."""
        record.cost, record.cost_source = None, None
        self._ledger.add(record)

    def _finish(self, record: CompletionRecord, estimate: float) -> float:
        """Set the record's cost, hand it to the ledger and the metrics; what it cost."""
        _attribute_cost(record, estimate)
        self._ledger.add(record)
        metrics = self._metrics
        if record.outcome in UPSTREAM_FAILURES:
            metrics.upstream_errors.labels(record.outcome).inc()
        metrics.tokens_relayed(
            record.app, record.payer, record.prompt_tokens, record.completion_tokens
        )
        # A cost still to be looked up is counted once it is known (lookups.py).
        if record.cost and record.cost_owed_until is None:
            metrics.cost_settled(record.app, record.model, record.payer, record.cost)
        return record.cost or 0.0


def _attribute_cost(record: CompletionRecord, estimate: float) -> None:
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


SPEND = web.AppKey("spend", Spend)
