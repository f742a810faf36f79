"""Prometheus metrics (prometheus-client), in a registry of the app's own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from qp.storage.batches import DROP_REASONS

# Label values that come from clients (app names, methods) are capped, so nobody can grow
# the metrics without bound; past the cap they count as "other".
MAX_APPS = 100
MAX_MODELS = 100
# A client that left before its answer was sent (nginx's code for it).
CLIENT_LEFT = 499


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qp_requests", "Requests answered", ["route", "method", "status"], registry=r
        )
        self.duration = Histogram(
            "qp_request_duration_seconds",
            "Time to answer a request (a completion: to the end of its stream)",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300),
            registry=r,
        )
        self.open_streams = Gauge(
            "qp_open_streams", "Completion streams being relayed now", registry=r
        )
        self.upstream_errors = Counter(
            "qp_upstream_errors",
            "Completions that failed upstream, by kind (timeout, unreachable, upstream_error,"
            " upstream_idle, upstream_died)",
            ["kind"],
            registry=r,
        )
        self.upstream_attempts = Counter(
            "qp_upstream_attempts",
            "Requests sent upstream for completions, by result: answered (2xx), 429, 5xx"
            " (and 408: tried again), refused (another status: not tried again), unreachable,"
            " timeout",
            ["result"],
            registry=r,
        )
        # Its children by result, made once (each shown from the start, at 0).
        self.attempt_results = {
            result: self.upstream_attempts.labels(result)
            for result in ("answered", "429", "5xx", "refused", "unreachable", "timeout")
        }
        self.fallback_answers = Counter(
            "qp_fallback_answers",
            "Completions a fallback model answered (the one asked for failed)",
            registry=r,
        )
        self.breaker_skips = Counter(
            "qp_breaker_skips",
            "Times a model was skipped because its breaker was open",
            registry=r,
        )
        self.cache_hits = Counter(
            "qp_response_cache_hits",
            "Completions answered from the response cache: a stored answer replayed (stored),"
            " or the stream of an identical request in flight followed (in_flight)",
            ["kind"],
            registry=r,
        )
        # Its children by kind, made once (each shown from the start, at 0).
        kinds = ("stored", "in_flight")
        self.cache_hits_of = {kind: self.cache_hits.labels(kind) for kind in kinds}
        self.cache_misses = Counter(
            "qp_response_cache_misses",
            "Completions the response cache was on for that went upstream",
            registry=r,
        )
        self.cache_bytes_replayed = Counter(
            "qp_response_cache_replayed_bytes",
            "Bytes of answers written to clients from the response cache",
            registry=r,
        )
        self.cache_stored_bytes = Counter(
            "qp_response_cache_stored_bytes",
            "Bytes of answers stored in the response cache",
            registry=r,
        )
        self.app_refusals = Counter(
            "qp_app_policy_refusals",
            "Completions the server's keys would have paid that an app's policy refused, by"
            " app and reason (unknown_app, model, cap, prefix)",
            ["app", "reason"],
            registry=r,
        )
        self.rate_limit_refusals = Counter(
            "qp_rate_limit_refusals",
            "Requests refused by the rate limits, by class and why (minute, hour, blocked)",
            ["rate_class", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "qp_completion_tokens",
            "Tokens of relayed completions, by app, payer and kind (prompt, completion)",
            ["app", "payer", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "qp_completion_cost_usd",
            "Cost of relayed completions as OpenRouter reports it, by app and payer",
            ["app", "payer"],
            registry=r,
        )
        self.spend = Counter(
            "qp_spend_usd",
            "What completions cost as the ledger first records it (the stream's usage, else"
            " the estimate), by app, model and payer",
            ["app", "model", "payer"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "qp_budget_refusals",
            "Completions refused before going upstream, by budget (server_daily,"
            " server_monthly, app_daily, client_daily, client_max_streams)",
            ["scope"],
            registry=r,
        )
        self.batch_drops = Counter(
            "qp_batch_items_dropped",
            "Background writes given up (ledger rows), by batch and why (unavailable: the"
            " database stayed away; refused: it could not store the item; queue_full)",
            ["batch", "reason"],
            registry=r,
        )
        self.relay_overhead = Histogram(
            "qp_relay_overhead_seconds",
            "The server's own time in a streamed completion: from the request's arrival to"
            " the upstream request, and from upstream's answer and first chunk to the client's,"
            " upstream's waits left out",
            buckets=(
                0.00005,
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.25,
            ),
            registry=r,
        )
        self.loop_lag = Histogram(
            "qp_event_loop_lag_seconds",
            "How late the event loop woke a task sleeping 0.1 s: time nothing else could run",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.connections_closed = Counter(
            "qp_connections_closed",
            "Connections the server closed on its own: header_timeout (headers too slow),"
            " too_many (over QP_MAX_CONNECTIONS)",
            ["reason"],
            registry=r,
        )
        self._apps: set[str] = set()
        self._models: set[str] = set()
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        # The children of the labelled counters each completion counts in, by their labels
        # (`labels()` validates and locks on every call; the labels are capped, so are these).
        self._token_series: dict[tuple[str, str, str], Counter] = {}
        self._cost_series: dict[tuple[str, str, str], tuple[Counter, Counter]] = {}

    def request_series(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        """The request counter and duration histogram of one route, method and status (kept:
        `labels()` on every request was a measurable part of a cached GET)."""
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route, method),
            )
        return series

    def app_label(self, app: str | None) -> str:
        if app is None:
            return ""
        if app in self._apps or len(self._apps) < MAX_APPS:
            self._apps.add(app)
            return app
        return "other"

    def tokens_relayed(
        self, app: str | None, payer: str, prompt: int | None, completion: int | None
    ) -> None:
        label = self.app_label(app)
        if prompt:
            self._tokens(label, payer, "prompt").inc(prompt)
        if completion:
            self._tokens(label, payer, "completion").inc(completion)

    def _tokens(self, label: str, payer: str, kind: str) -> Counter:
        key = (label, payer, kind)
        series = self._token_series.get(key)
        if series is None:
            series = self._token_series[key] = self.tokens.labels(label, payer, kind)
        return series

    def cost_settled(self, app: str | None, model: str, payer: str, cost: float) -> None:
        key = (self.app_label(app), self.model_label(model), payer)
        series = self._cost_series.get(key)
        if series is None:
            label, model_label, _ = key
            series = self._cost_series[key] = (
                self.cost.labels(label, payer),
                self.spend.labels(label, model_label, payer),
            )
        series[0].inc(cost)
        series[1].inc(cost)

    def app_refused(self, app: str | None, reason: str) -> None:
        self.app_refusals.labels(self.app_label(app), reason).inc()

    def app_refusal_counts(self) -> dict[str, dict[str, int]]:
        """This process's refusals so far: app label -> reason -> count."""
        counts: dict[str, dict[str, int]] = {}
        for family in self.app_refusals.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    app, reason = sample.labels["app"], sample.labels["reason"]
                    counts.setdefault(app, {})[reason] = int(sample.value)
        return counts

    def model_label(self, model: str) -> str:
        """Models are the client's to name (with its own key): capped like apps."""
        if model in self._models or len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def watch_budgets(self, remaining: Callable[[], list[tuple[str, float]]]) -> None:
        """Expose what remains of each budget in force: (scope, USD) pairs."""
        self.registry.register(_BudgetCollector(remaining))

    def watch_breakers(self, open_models: Callable[[], dict[str, int]]) -> None:
        """Expose the models whose breaker is open now (bounded by the cheap list)."""
        self.registry.register(_BreakerCollector(open_models))

    def watch_write_groups(self, committed: Callable[[], tuple[int, int]]) -> None:
        """Expose SQLite's group commits: the groups, and the writes they held."""
        self.registry.register(_WriteGroupCollector(committed))

    def watch_rate_limiter(self, tracked: Callable[[], int], forgotten: Callable[[], int]) -> None:
        """Expose the rate limiter's table: counters held, and those forgotten past its cap."""
        self.registry.register(_RateLimiterCollector(tracked, forgotten))

    def counter_of_drops(self, batch: str) -> Callable[[int, str], None]:
        """What a BatchWriter calls with the number of items it gave up, and why (each
        why shown from the start, at 0)."""
        for reason in DROP_REASONS:
            self.batch_drops.labels(batch, reason)

        def dropped(count: int, reason: str) -> None:
            self.batch_drops.labels(batch, reason).inc(count)

        return dropped

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BudgetCollector(Collector):
    def __init__(self, remaining: Callable[[], list[tuple[str, float]]]):
        self._remaining = remaining

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "qp_budget_remaining_usd",
            "What remains of each budget in force (cap - spent - reserved), by scope"
            " (server_daily, server_monthly, app:{app})",
            labels=["scope"],
        )
        for scope, remaining in self._remaining():
            family.add_metric([scope], remaining)
        yield family


class _BreakerCollector(Collector):
    def __init__(self, open_models: Callable[[], dict[str, int]]):
        self._open_models = open_models

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "qp_breaker_open_seconds",
            "Models skipped because they kept failing, with the seconds until each is tried again",
            labels=["model"],
        )
        for model, seconds in sorted(self._open_models().items()):
            family.add_metric([model], seconds)
        yield family


class _WriteGroupCollector(Collector):
    def __init__(self, committed: Callable[[], tuple[int, int]]):
        self._committed = committed

    def collect(self) -> Iterable[Metric]:
        groups, writes = self._committed()
        yield CounterMetricFamily(
            "qp_write_groups",
            "SQLite transactions that committed chat writes (each one fsync), groups of up to 64",
            value=groups,
        )
        yield CounterMetricFamily(
            "qp_grouped_writes",
            "Chat writes those transactions committed: over qp_write_groups_total, the mean"
            " group size",
            value=writes,
        )


class _RateLimiterCollector(Collector):
    def __init__(self, tracked: Callable[[], int], forgotten: Callable[[], int]):
        self._tracked = tracked
        self._forgotten = forgotten

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "qp_rate_limit_tracked",
            "Rate-limit counters held (client and class)",
            value=self._tracked(),
        )
        yield CounterMetricFamily(
            "qp_rate_limit_forgotten",
            "Rate-limit counters dropped past the table's cap, least recently seen first",
            value=self._forgotten(),
        )


METRICS = web.AppKey("metrics", Metrics)
