"""The application factory: one place that builds the app, its resources and their order."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiohttp import web

from qp.appkeys import (
    BYTE_BUDGET,
    CHAT_STORE,
    CONFIG,
    DAILY_QUOTA,
    DATABASE,
    DISK_SPACE,
    IP_SALT,
    LEDGER,
    METRICS,
    POLICY,
    RATE_CLASSES,
    RATE_LIMITER,
    SHUTTING_DOWN,
    UPSTREAM,
)
from qp.auth import ADMIN_GUARD, AdminGuard
from qp.batches import BatchWriter
from qp.blobs import BlobStore, StoreNotReady, file_store_root, open_blob_store
from qp.budget import ByteBudget
from qp.chat_cache import ChatCache
from qp.chat_store import ChatStore
from qp.claim import Claim, ClaimHeld
from qp.config import Config
from qp.cors import setup_cors
from qp.db import READER_COUNT, Database, SchemaTooNew
from qp.disk import DiskSpace
from qp.errors import ConfigError, StorageUnavailable, error_middleware
from qp.metrics import Metrics
from qp.ops import observe_middleware
from qp.policy import PolicyHolder
from qp.policy_loader import load_policy
from qp.protection import load_blocks, open_rate_limiter, rate_limit_middleware
from qp.quota import DailyQuota
from qp.rate_limits import RateLimiter
from qp.relay import open_upstream_session
from qp.routes import add_routes

log = logging.getLogger("qp.app")
LAG_PROBE_SECONDS = 0.1


class StartupError(Exception):
    """A resource cannot be opened; the message is one line naming it."""


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[observe_middleware, error_middleware, rate_limit_middleware])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[POLICY] = PolicyHolder(config.policy)
    app[SHUTTING_DOWN] = asyncio.Event()
    app[ADMIN_GUARD] = AdminGuard()
    app[DAILY_QUOTA] = DailyQuota()
    app[BYTE_BUDGET] = ByteBudget(config.max_inflight_bytes)
    app.on_shutdown.append(_note_shutdown)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_reload_on_sighup)
    app.cleanup_ctx.append(_watch_loop_lag)
    app[RATE_CLASSES] = add_routes(app.router)
    setup_cors(app, lambda: app[POLICY].current.origin_matcher)
    return app


def lock_files(config: Config) -> list[tuple[Path, Path, str]]:
    """(lock file, what it guards, its setting): the database, and a file store's folder."""
    database = config.database_path
    locks = [(database.with_name(database.name + ".lock"), database, "QP_DATABASE")]
    if config.storage_url.startswith("file://"):
        root = file_store_root(config.storage_url)
        locks.append((root / ".qp-server.lock", root, "QP_STORAGE"))
    return locks


def claim_record(config: Config) -> dict[str, Any]:
    """What the lock files say of their holder: who it is, and what a repair beside it
    needs to know (its blob store, and how long its writes may take)."""
    return {
        "pid": os.getpid(),
        "database": str(config.database_path.resolve()),
        "storage": storage_identity(config.storage_url),
        "write_deadline": config.write_deadline,
    }


def storage_identity(url: str) -> str:
    """The blob store a URL names, comparable between processes (a folder made absolute)."""
    if url.startswith("file://"):
        return "file://" + str(file_store_root(url).resolve())
    return url


def take_claims(config: Config, stack: AsyncExitStack) -> list[Claim]:
    """Claim the database (and file blob folder) for this process, released by `stack`.
    Raises ClaimHeld (naming what is held in `guarded`), or StartupError when a lock file
    cannot be made."""
    claims = []
    for lock, guarded, setting in lock_files(config):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            claim = Claim.take(lock, claim_record(config))
        except ClaimHeld as held:
            held.guarded = guarded
            raise
        except OSError as err:
            raise StartupError(f"{setting} {guarded}: cannot claim it: {err}") from None
        stack.callback(claim.release)
        claims.append(claim)
    return claims


def disk_space(config: Config) -> DiskSpace:
    folders = [config.database_path.parent]
    if config.storage_url.startswith("file://"):
        folders.append(file_store_root(config.storage_url))
    reserve = config.database_path.with_name(config.database_path.name + ".reserve")
    return DiskSpace(folders, config.min_free_bytes, reserve)


async def open_storage(
    config: Config,
    stack: AsyncExitStack,
    reader_count: int = READER_COUNT,
    space: DiskSpace | None = None,
) -> tuple[Database, BlobStore]:
    """Open the database, then the blob store, both closed by `stack`; StartupError names
    the one that cannot be opened."""
    make_room = space.release_reserve if space is not None else None
    try:
        db = await Database.open(config.database_path, reader_count, make_room)
    except (sqlite3.Error, OSError, SchemaTooNew) as err:
        raise StartupError(f"QP_DATABASE {config.database_path}: {err}") from None
    stack.push_async_callback(db.close)
    try:
        blobs = await open_blob_store(
            config.storage_url,
            config.s3_endpoint_url,
            config.aws_region,
            stack,
            s3_timeout=config.s3_timeout,
        )
    except StoreNotReady as err:
        raise StartupError(f"QP_STORAGE {config.storage_url}: {err}") from None
    return db, blobs


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Claim the database, open it, then the blob store; close them in reverse order at
    shutdown. Interrupted writes are finished or undone only under the claim."""
    config = app[CONFIG]
    metrics = app[METRICS]
    async with AsyncExitStack() as stack:
        try:
            claims = take_claims(config, stack)
        except ClaimHeld as held:
            raise StartupError(
                f"another qp-server (pid {held.pid}) is serving {held.guarded}"
            ) from None
        app[DISK_SPACE] = space = disk_space(config)
        await asyncio.to_thread(space.keep_reserve)
        db, blobs = await open_storage(config, stack, space=space)
        app[DATABASE] = db
        app[CHAT_STORE] = store = ChatStore(
            db,
            blobs,
            ChatCache(config.cache_bytes),
            write_deadline=config.write_deadline,
            space=space,
            on_drop=metrics.counter_of_drops("settled"),
        )
        await db.changed_elsewhere()  # the baseline, taken while the cache is still empty
        stack.push_async_callback(store.close)
        counts = await store.recover()
        if counts["finished"] or counts["undone"]:
            log.warning(
                "recovered %d chat writes a stop interrupted: %d finished, %d undone",
                counts["finished"] + counts["undone"],
                counts["finished"],
                counts["undone"],
            )
        if counts["unresolved"]:
            log.error(
                "%d interrupted chat writes cannot be resolved yet (their chats answer 503);"
                " retrying in the background",
                counts["unresolved"],
            )
        if await store.count_stored():
            sizes = asyncio.create_task(_learn_sizes(store))
            stack.callback(sizes.cancel)
        app[LEDGER] = ledger = BatchWriter(
            db.insert_completions, "ledger rows", metrics.counter_of_drops("ledger")
        )
        stack.push_async_callback(ledger.close)
        app[IP_SALT] = config.ip_salt or await _installation_salt(db)
        app[RATE_LIMITER] = limiter = await open_rate_limiter(db)
        metrics.watch_rate_limiter(limiter)
        chores = Housekeeping(db, store, limiter, space, claims, claim_record(config))
        task = asyncio.create_task(chores.run())
        stack.callback(task.cancel)
        yield


async def _learn_sizes(store: ChatStore) -> None:
    """Rows imported without their messages' size learn it from the blob store."""
    try:
        learned = await store.learn_sizes()
    except StorageUnavailable as err:
        log.warning("cannot learn the sizes of imported chats yet: %s", err)
        return
    log.info("learned the size of %d imported chats from the blob store", learned)


async def _installation_salt(db: Database) -> str:
    try:
        return await db.installation_salt()
    except StorageUnavailable as err:
        raise StartupError(f"cannot keep the address-hash salt in the database: {err}") from None


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


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    async with open_upstream_session() as session:
        app[UPSTREAM] = session
        yield


class Housekeeping:
    """What the server checks every second, in a task that must never die: each chore's
    failure is logged (once a minute at most) and the next round runs anyway."""

    ROUND_SECONDS = 1.0
    RESERVE_EVERY_ROUNDS = 10
    LOG_EVERY_SECONDS = 60.0

    def __init__(
        self,
        db: Database,
        store: ChatStore,
        limiter: RateLimiter,
        space: DiskSpace,
        claims: list[Claim],
        record: dict[str, Any],
    ):
        self._db = db
        self._store = store
        self._limiter = limiter
        self._space = space
        self._claims = claims
        self._record = record
        self._logged: dict[str, float] = {}

    async def run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.ROUND_SECONDS)
            rounds += 1
            await self._chore("follow outside changes", self._follow_changes_made_elsewhere)
            await self._chore("check the database file", self._check_files)
            await self._chore("retry failed writes", self._store.retry_unresolved)
            if rounds % self.RESERVE_EVERY_ROUNDS == 0:
                await self._chore(
                    "keep the disk reserve", lambda: asyncio.to_thread(self._space.keep_reserve)
                )

    async def _chore(self, name: str, chore: Callable[[], Awaitable[None]]) -> None:
        try:
            await chore()
        except Exception as err:
            now = time.monotonic()
            if now - self._logged.get(name, -self.LOG_EVERY_SECONDS) >= self.LOG_EVERY_SECONDS:
                self._logged[name] = now
                log.error("housekeeping: cannot %s: %s: %s", name, type(err).__name__, err)

    async def _follow_changes_made_elsewhere(self) -> None:
        """The operators' tools (python -m qp) write to the database directly: when they
        have, drop the cached chats and take the blocks in force from the database again."""
        if await self._db.changed_elsewhere():
            self._store.forget_all()
            self._limiter.replace_blocks(await load_blocks(self._db))
            await self._store.count_stored()

    async def _check_files(self) -> None:
        """The database file still ours and whole; the lock files still ours."""
        self._db.check_file()
        for claim in self._claims:
            if claim.still_held():
                continue
            if claim.renew(self._record):
                log.warning("lock file %s was removed or replaced; claimed again", claim.lock_path)
            else:
                self._db.refuse_writes(f"{claim.lock_path} was taken by another process")
