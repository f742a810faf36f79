"""The application factory: one place that builds the app, its resources and their order."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from aiohttp import web

from qp.appkeys import (
    CHAT_STORE,
    CONFIG,
    DATABASE,
    IP_SALT,
    LEDGER,
    METRICS,
    POLICY,
    RATE_CLASSES,
    RATE_LIMITER,
    UPSTREAM,
)
from qp.batches import BatchWriter
from qp.blobs import BlobStore, StoreNotReady, open_blob_store
from qp.chat_cache import ChatCache
from qp.chat_store import ChatStore
from qp.config import Config
from qp.cors import setup_cors
from qp.db import READER_COUNT, Database, SchemaTooNew
from qp.errors import ConfigError, StorageUnavailable, error_middleware
from qp.metrics import Metrics
from qp.ops import observe_middleware
from qp.policy import PolicyHolder
from qp.policy_loader import load_policy
from qp.protection import load_blocks, open_rate_limiter, rate_limit_middleware
from qp.rate_limits import RateLimiter
from qp.relay import open_upstream_session
from qp.routes import add_routes

log = logging.getLogger("qp.app")
EXTERNAL_CHANGE_POLL_SECONDS = 1.0


class StartupError(Exception):
    """A resource cannot be opened; the message is one line naming it."""


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[observe_middleware, error_middleware, rate_limit_middleware])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[POLICY] = PolicyHolder(config.policy)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_reload_on_sighup)
    app[RATE_CLASSES] = add_routes(app.router)
    setup_cors(app, lambda: app[POLICY].current.origin_matcher)
    return app


async def open_storage(
    config: Config, stack: AsyncExitStack, reader_count: int = READER_COUNT
) -> tuple[Database, BlobStore]:
    """Open the database, then the blob store, both closed by `stack`; StartupError names
    the one that cannot be opened."""
    try:
        db = await Database.open(config.database_path, reader_count)
    except (sqlite3.Error, OSError, SchemaTooNew) as err:
        raise StartupError(f"QP_DATABASE {config.database_path}: {err}") from None
    stack.push_async_callback(db.close)
    try:
        blobs = await open_blob_store(
            config.storage_url, config.s3_endpoint_url, config.aws_region, stack
        )
    except StoreNotReady as err:
        raise StartupError(f"QP_STORAGE {config.storage_url}: {err}") from None
    return db, blobs


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Open the database, then the blob store; close them in reverse order at shutdown."""
    config = app[CONFIG]
    async with AsyncExitStack() as stack:
        db, blobs = await open_storage(config, stack)
        app[DATABASE] = db
        app[CHAT_STORE] = store = ChatStore(db, blobs, ChatCache(config.cache_bytes))
        await db.changed_elsewhere()  # the baseline, taken while the cache is still empty
        stack.push_async_callback(store.close)
        finished, undone = await store.recover()
        if finished or undone:
            log.warning(
                "recovered %d chat writes a stop interrupted: %d finished, %d undone",
                finished + undone,
                finished,
                undone,
            )
        app[LEDGER] = ledger = BatchWriter(db.insert_completions, "ledger rows")
        stack.push_async_callback(ledger.close)
        app[IP_SALT] = config.ip_salt or await db.installation_salt()
        app[RATE_LIMITER] = limiter = await open_rate_limiter(db)
        watcher = asyncio.create_task(_follow_changes_made_elsewhere(db, store, limiter))
        stack.callback(watcher.cancel)
        yield


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


async def _follow_changes_made_elsewhere(
    db: Database, store: ChatStore, limiter: RateLimiter
) -> None:
    """The operators' tools (python -m qp) write to the database directly: when they have,
    drop the cached chats and take the blocks in force from the database again."""
    while True:
        await asyncio.sleep(EXTERNAL_CHANGE_POLL_SECONDS)
        try:
            if await db.changed_elsewhere():
                store.forget_all()
                limiter.replace_blocks(await load_blocks(db))
        except StorageUnavailable as err:
            log.warning("cannot poll the database for outside changes: %s", err)
