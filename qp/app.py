"""The application factory: one place that builds the app, its resources and their order."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from aiohttp import web

from qp.appkeys import CHAT_STORE, CONFIG, DATABASE, LEDGER, POLICY, UPSTREAM
from qp.blobs import StoreNotReady, open_blob_store
from qp.chat_cache import ChatCache
from qp.chat_store import ChatStore
from qp.config import Config
from qp.cors import setup_cors
from qp.db import Database, SchemaTooNew
from qp.errors import StorageUnavailable, error_middleware
from qp.ledger import SpendLedger
from qp.policy import PolicyHolder
from qp.relay import open_upstream_session
from qp.routes import add_routes

log = logging.getLogger("qp.app")
EXTERNAL_CHANGE_POLL_SECONDS = 1.0


class StartupError(Exception):
    """A resource cannot be opened; the message is one line naming it."""


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app[POLICY] = PolicyHolder(config.policy)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_upstream)
    add_routes(app.router)
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
        yield


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
