"""The application factory: one place that builds the app, its resources and their order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from functools import partial

from aiohttp import web

from qp.appkeys import CLOCK, SHUTTING_DOWN, STARTED_AT
from qp.chats.cache import ChatCache
from qp.chats.store import CHAT_STORE, ChatStore
from qp.chats.upgrade import resolve_old_writes
from qp.completions.breakers import BREAKERS, ModelBreakers
from qp.completions.cache import RESPONSE_CACHE
from qp.completions.flights import FLIGHTS, RESPONSE_CACHE_ENTRY_BYTES, Flights
from qp.completions.relay import UPSTREAM, Upstream, open_upstream_session
from qp.config import CONFIG, Config
from qp.errors import ConfigError, StorageUnavailable
from qp.metrics import METRICS, Metrics
from qp.middlewares import MIDDLEWARES
from qp.ops.housekeeping import Housekeeping
from qp.policy.loader import load_policy
from qp.policy.policy import POLICY, Policy, PolicyHolder
from qp.protection.admin import ADMIN_GUARD, AdminGuard
from qp.protection.blocks import open_rate_limiter
from qp.protection.client_address import IP_SALT, installation_salt
from qp.protection.cors import setup_cors
from qp.protection.inflight_bytes import INFLIGHT_BYTES, InflightBytes
from qp.protection.quota import DAILY_QUOTA, DailyQuota
from qp.protection.rate_limits import RATE_CLASSES, RATE_LIMITER
from qp.routes import add_routes
from qp.spend.alerts import ALERTS, Alerts
from qp.spend.budgets import (
    BUDGETS,
    OpenStreams,
    budgets_in_force,
    open_budget_book,
)
from qp.spend.ledger import LEDGER, insert_records
from qp.spend.lookups import CostLookups
from qp.spend.prices import PRICES, PriceList
from qp.spend.spending import SPEND, Spend
from qp.startup import (
    Processes,
    StartupError,
    claim_record,
    disk_space,
    open_configured_blob_store,
    open_processes,
    take_claims,
)
from qp.storage.batches import BatchWriter
from qp.storage.blobs import BlobStore
from qp.storage.claim import Claim, ClaimHeld
from qp.storage.database import DATABASE
from qp.storage.disk import DISK_SPACE
from qp.storage.sqlite import SqliteDatabase

log = logging.getLogger("qp.app")
LAG_PROBE_SECONDS = 0.1


def create_app(
    config: Config, policy: Policy, clock: Callable[[], float] = time.time
) -> web.Application:
    """The app for `config`, starting with `policy` in force; budget periods roll over by
    `clock` (tests set the day)."""
    app = web.Application(middlewares=MIDDLEWARES)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[STARTED_AT] = clock()
    app[METRICS] = Metrics()
    app[POLICY] = PolicyHolder(policy)
    app[SHUTTING_DOWN] = asyncio.Event()
    app[ADMIN_GUARD] = AdminGuard()
    app[DAILY_QUOTA] = DailyQuota()
    app[INFLIGHT_BYTES] = InflightBytes(config.max_inflight_bytes)
    app[BREAKERS] = breakers = ModelBreakers(clock)
    app[METRICS].watch_breakers(lambda: breakers.open_models(app[POLICY].current))
    app[RATE_CLASSES] = add_routes(app.router)
    setup_cors(app, lambda: app[POLICY].current.origin_matcher)
    app.on_shutdown.append(_note_shutdown)
    # Each resource opens before its `yield` and closes after, in this order (and the
    # reverse at shutdown); each needs only those above it.
    app.cleanup_ctx.extend(
        [
            _claims,
            _database,
            _peers,
            _blob_store,
            _chat_store,
            _upstream,
            _spend,
            _flights,
            _protection,
            _housekeeping,
            _reload_on_sighup,
            _watch_loop_lag,
        ]
    )
    return app


CLAIMS = web.AppKey("claims", list[Claim])
BLOB_STORE = web.AppKey("blob_store", BlobStore)
PROCESSES = web.AppKey("processes", Processes)


async def _claims(app: web.Application) -> AsyncIterator[None]:
    """This process's claim on the database file and the blob folder (lock files), and the
    disk's free-space reserve."""
    config = app[CONFIG]
    async with AsyncExitStack() as stack:
        try:
            app[CLAIMS] = take_claims(config, stack)
        except ClaimHeld as held:
            raise StartupError(
                f"another qp-server (pid {held.pid}) is serving {held.guarded}"
            ) from None
        app[DISK_SPACE] = space = disk_space(config)
        await asyncio.to_thread(space.keep_reserve)
        yield


async def _database(app: web.Application) -> AsyncIterator[None]:
    """SQLite or PostgreSQL, its schema brought up to date; and with it, what differs
    between one server process and several (qp/startup.py)."""
    db, app[PROCESSES] = await open_processes(app[CONFIG], space=app[DISK_SPACE])
    app[DATABASE] = db
    if isinstance(db, SqliteDatabase):
        app[METRICS].watch_write_groups(lambda: (db.groups_committed, db.writes_committed))
    try:
        yield
    finally:
        await db.close()


async def _peers(app: web.Application) -> AsyncIterator[None]:
    """This process among the others writing to the database (PostgreSQL: its lease,
    renewed every second in a task and ended at a clean stop)."""
    peers = app[PROCESSES].peers
    with _storage_failure_stops("cannot take a process lease in the database"):
        await peers.join()
    renewing = asyncio.create_task(peers.keep())
    yield
    renewing.cancel()
    with contextlib.suppress(StorageUnavailable):
        await peers.release()


async def _blob_store(app: web.Application) -> AsyncIterator[None]:
    """The folder or S3 bucket the chats' messages live in."""
    async with AsyncExitStack() as stack:
        app[BLOB_STORE] = await open_configured_blob_store(app[CONFIG], stack)
        yield


async def _chat_store(app: web.Application) -> AsyncIterator[None]:
    """The chats: rows in the database, messages in the blob store, a cache in memory."""
    config, db, blobs = app[CONFIG], app[DATABASE], app[BLOB_STORE]
    peers = app[PROCESSES].peers
    with _storage_failure_stops("cannot resolve the writes an older version left"):
        await resolve_old_writes(db, blobs)
    app[CHAT_STORE] = store = ChatStore(
        db,
        blobs,
        ChatCache(config.cache_bytes),
        peers,
        space=app[DISK_SPACE],
        abandon_seconds=config.write_abandon_seconds,
    )
    await peers.changed_elsewhere()  # the baseline, taken while the cache is still empty
    sizes = asyncio.create_task(_learn_sizes(store)) if await store.unknown_sizes() else None
    yield
    if sizes is not None:
        sizes.cancel()
    await store.close()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    """The one client session to OpenRouter."""
    async with open_upstream_session() as session:
        app[UPSTREAM] = Upstream(session, app[SHUTTING_DOWN])
        yield


async def _flights(app: web.Application) -> AsyncIterator[None]:
    """The response cache (shared by the processes on one PostgreSQL database) and the
    completions in flight for it, which end before the ledger closes."""
    config = app[CONFIG]
    app[RESPONSE_CACHE] = app[PROCESSES].response_cache(config.response_cache_bytes, app[CLOCK])
    app[RESPONSE_CACHE_ENTRY_BYTES] = config.response_cache_entry_bytes
    app[FLIGHTS] = flights = Flights(config.response_cache_bytes)
    yield
    await flights.close()


async def _spend(app: web.Application) -> AsyncIterator[None]:
    """The ledger, the budgets, the prices and the alerts; and their chores: settling the
    costs still owed (this process's, and those a stop left behind), keeping the prices
    fresh, sending the alerts."""
    config, db, metrics = app[CONFIG], app[DATABASE], app[METRICS]
    session = app[UPSTREAM].session

    def policy() -> Policy:
        return app[POLICY].current

    app[LEDGER] = ledger = BatchWriter(
        partial(insert_records, db), "ledger rows", metrics.counter_of_drops("ledger")
    )
    try:
        app[ALERTS] = alerts = Alerts(config.alert_webhook_url)
        accounts = app[PROCESSES].budget_accounts(app[CLOCK], alerts.budget_passed)
        with _storage_failure_stops("cannot read what the ledger spent today"):
            app[BUDGETS] = book = await open_budget_book(db, accounts, app[CLOCK])
        metrics.watch_budgets(
            lambda: [
                (scope.named, book.remaining(scope, cap))
                for scope, cap in budgets_in_force(book, policy())
            ]
        )
        app[PRICES] = prices = PriceList(db)
        with _storage_failure_stops("cannot read the model prices kept in the database"):
            await prices.load()
        app[SPEND] = Spend(book, OpenStreams(), ledger, metrics)
        lookups = CostLookups(
            db,
            session,
            policy,
            book,
            config.openrouter_api_key,
            config.app_openrouter_keys,
            metrics,
        )
        tasks = [
            asyncio.create_task(lookups.run()),
            asyncio.create_task(alerts.run(session)),
            asyncio.create_task(book.run()),
        ]
        # Prices serve estimates of what the server's keys pay: with no key, none is fetched.
        if config.openrouter_api_key or config.app_openrouter_keys:
            tasks.append(asyncio.create_task(prices.run(session, policy)))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await ledger.close()


async def _protection(app: web.Application) -> AsyncIterator[None]:
    """The salt client addresses are hashed with, and the rate limiter with its blocks."""
    config, db, processes = app[CONFIG], app[DATABASE], app[PROCESSES]
    with _storage_failure_stops("cannot keep the address-hash salt in the database"):
        app[IP_SALT] = config.ip_salt or await installation_salt(db)
    counts = processes.rate_counts(config.rate_limit_clients)
    with _storage_failure_stops("cannot read the blocked clients from the database"):
        app[RATE_LIMITER] = limiter = await open_rate_limiter(db, counts, processes.peers)
    app[METRICS].watch_rate_limiter(lambda: limiter.tracked, lambda: limiter.forgotten)
    yield


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """What the server checks every second (qp/ops/housekeeping.py)."""
    config = app[CONFIG]
    chores = Housekeeping(
        app[DATABASE],
        app[PROCESSES].peers,
        app[CHAT_STORE],
        app[RATE_LIMITER],
        app[DISK_SPACE],
        app[CLAIMS],
        claim_record(config),
    )
    task = asyncio.create_task(chores.run())
    yield
    task.cancel()


async def _learn_sizes(store: ChatStore) -> None:
    """Rows imported without their messages' size learn it from the blob store."""
    try:
        learned = await store.learn_sizes()
    except StorageUnavailable as err:
        log.warning("cannot learn the sizes of imported chats yet: %s", err)
        return
    log.info("learned the size of %d imported chats from the blob store", learned)


@contextlib.contextmanager
def _storage_failure_stops(what: str) -> Iterator[None]:
    """A start-up step the database or blob store fails: a StartupError naming it."""
    try:
        yield
    except StorageUnavailable as err:
        raise StartupError(f"{what}: {err}") from None


async def _watch_loop_lag(app: web.Application) -> AsyncIterator[None]:
    async def watch() -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_PROBE_SECONDS)
            app[METRICS].loop_lag.observe(max(0.0, loop.time() - started - LAG_PROBE_SECONDS))

    task = asyncio.create_task(watch())
    yield
    task.cancel()


async def _note_shutdown(app: web.Application) -> None:
    app[SHUTTING_DOWN].set()


async def _reload_on_sighup(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload_policy, app)
    yield
    loop.remove_signal_handler(signal.SIGHUP)


def reload_policy(app: web.Application) -> bool:
    """Re-read the policy; new requests get it, requests in flight keep theirs. A policy
    that does not load is refused and the old one stays."""
    config = app[CONFIG]
    try:
        policy = load_policy(os.environ, config.config_path)
    except ConfigError as err:
        log.error("policy reload refused, the old policy stays: %s", err)
        return False
    app[POLICY].current = policy
    log.info("policy reloaded from %s", config.config_path or "the environment")
    return True
