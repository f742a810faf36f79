"""Handler for POST /api/completion: check the request, choose who pays, reserve, relay."""

from __future__ import annotations

from aiohttp import web

from qp.bodies import body_allowance, read_json
from qp.completions.attempts import Payload
from qp.completions.flights import cached_completion
from qp.completions.relay import UPSTREAM, relay_completion
from qp.completions.request import (
    AppRefusal,
    cache_key,
    check_system_message,
    choose_key,
    max_completion_tokens,
    parse_completion,
    upstream_body,
)
from qp.config import CONFIG
from qp.logs import CLIENT_HASH, RELAY_OVERHEAD
from qp.metrics import METRICS
from qp.policy.policy import POLICY
from qp.protection.inflight_bytes import INFLIGHT_BYTES
from qp.spend.budgets import estimate_cost
from qp.spend.prices import PRICES
from qp.spend.record import CompletionRecord
from qp.spend.spending import SPEND
from qp.timestamps import utc_now_iso


async def create_completion(request: web.Request) -> web.StreamResponse:
    policy = request.app[POLICY].current
    config = request.app[CONFIG]
    # The parsed request is charged to the in-flight bytes and let go before the stream starts:
    # a stream may stay open for minutes, holding only what it relays.
    async with request.app[INFLIGHT_BYTES].hold(
        body_allowance(request, policy.max_completion_body_bytes)
    ):
        user_key = request.headers.get("x-openrouter-key")
        try:
            completion = parse_completion(
                await read_json(request, policy.max_completion_body_bytes, policy),
                policy,
                paid_by_us=not user_key,
            )
            key, payer = choose_key(
                completion, user_key, policy, config.openrouter_api_key, config.app_openrouter_keys
            )
            check_system_message(completion, policy)
        except AppRefusal as refusal:
            request.app[METRICS].app_refused(refusal.app, refusal.reason)
            raise
        record = CompletionRecord(
            started_at=utc_now_iso(),
            app=completion.app,
            model=completion.model,
            payer=payer,
            client_hash=request[CLIENT_HASH],
        )
        body = upstream_body(completion)
        price = request.app[PRICES].price(policy, completion.model)
        estimate = estimate_cost(policy, price, len(body), max_completion_tokens(completion))
        payload = Payload(body, key)
        cached = payer != "user" and policy.cache_ttl_of(completion.app) > 0
        answer_key = cache_key(completion, payer) if cached else None
        del completion, body
    if answer_key is not None:
        return await cached_completion(request, policy, payload, record, estimate, answer_key)
    metrics = request.app[METRICS]
    try:
        async with request.app[SPEND].completion(policy, record, estimate):
            with metrics.open_streams.track_inprogress():
                return await relay_completion(
                    request, request.app[UPSTREAM], policy, payload, record
                )
    finally:
        # Observed once the stream is over, off the path of its chunks.
        overhead = request.get(RELAY_OVERHEAD)
        if overhead is not None:
            metrics.relay_overhead.observe(overhead)
