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
    POLICY,
    RATE_CLASSES,
    RATE_LIMITER,
    UPSTREAM,
)
from qp.blobs import StoreNotReady, open_blob_store
from qp.chat_cache import ChatCache
from qp.chat_store import ChatStore
from qp.config import Config
from qp.cors import setup_cors
from qp.db import Database, SchemaTooNew
from qp.errors import ConfigError, StorageUnavailable, error_middleware
from qp.ledger import SpendLedger
from qp.policy import PolicyHolder
from qp.policy_loader import load_policy
from qp.protection import open_rate_limiter, rate_limit_middleware
from qp.relay import open_upstream_session
from qp.routes import add_routes

log = logging.getLogger("qp.app")
EXTERNAL_CHANGE_POLL_SECONDS = 1.0


class StartupError(Exception):
    """A resource cannot be opened; the message is one line naming it."""


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[error_middleware, rate_limit_middleware])
    app[CONFIG] = config
    app[POLICY] = PolicyHolder(config.policy)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_reload_on_sighup)
    app[RATE_CLASSES] = add_routes(app.router)
    setup_cors(app, lambda: app[POLICY].current.origin_matcher)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Open the database, then the blob store; close them in reverse order at shutdown."""
    config = app[CONFIG]
    async with AsyncExitStack() as stack:
        try:
            db = await Database.open(config.database_path)
        except (sqlite3.Error, OSError, SchemaTooNew) as err:
            raise StartupError(f"QP_DATABASE {config.database_path}: {err}") from None
        stack.push_async_callback(db.close)
        try:
            blobs = await open_blob_store(
                config.storage_url, config.s3_endpoint_url, config.aws_region, stack
            )
        except StoreNotReady as err:
            raise StartupError(f"QP_STORAGE {config.storage_url}: {err}") from None
        app[DATABASE] = db
        app[CHAT_STORE] = store = ChatStore(db, blobs, ChatCache(config.cache_bytes))
        await db.changed_elsewhere()  # the baseline, taken while the cache is still empty
        watcher = asyncio.create_task(_forget_chats_changed_elsewhere(db, store))
        stack.callback(watcher.cancel)
        app[LEDGER] = ledger = SpendLedger(db)
        stack.push_async_callback(ledger.close)
        app[IP_SALT] = config.ip_salt or await db.installation_salt()
        app[RATE_LIMITER] = await open_rate_limiter(db)
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


async def _forget_chats_changed_elsewhere(db: Database, store: ChatStore) -> None:
    """The operators' tools write to the database directly; drop cached chats when they do."""
    while True:
        await asyncio.sleep(EXTERNAL_CHANGE_POLL_SECONDS)
        try:
            if await db.changed_elsewhere():
                store.forget_all()
        except StorageUnavailable as err:
            log.warning("cannot poll the database for outside changes: %s", err)
