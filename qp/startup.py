"""Opening the storage a server (or the operators' tools) works on: claiming the database
and blob folder for this process, the disk's free space and reserve, the database and the
blob store. Each failure is a StartupError, one line naming what cannot be opened.

The database chosen also decides, here and only here, what differs between one server
process (SQLite) and several sharing one database (PostgreSQL): who else writes there,
where rate limits count, where budget accounts are kept (`Processes`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

from qp.completions.cache import MemoryResponseCache, ResponseCache, SharedResponseCache
from qp.config import Config, database_shown
from qp.masking import mask_url, redact
from qp.protection.rate_limits import Counts, MemoryCounts
from qp.protection.shared_counts import SharedCounts
from qp.spend.budgets import BudgetAccounts, MemoryAccounts, OnPassed
from qp.spend.shared_budgets import SharedAccounts
from qp.storage.blobs import BlobStore, FileBlobStore, StoreNotReady, file_store_root
from qp.storage.claim import Claim, ClaimHeld
from qp.storage.database import Database
from qp.storage.disk import DiskSpace
from qp.storage.migrations import SchemaTooNew
from qp.storage.peers import Peers, SharedPeers, SoleWriter
from qp.storage.postgres import FAILURES as POSTGRES_FAILURES
from qp.storage.postgres import PostgresDatabase, describe_failure
from qp.storage.s3 import DEFAULT_S3_TIMEOUT, S3BlobStore
from qp.storage.sqlite import READER_COUNT, SqliteDatabase


async def open_blob_store(
    url: str,
    endpoint_url: str | None,
    region: str | None,
    exit_stack: AsyncExitStack,
    profile: str | None = None,
    s3_timeout: float = DEFAULT_S3_TIMEOUT,
) -> BlobStore:
    """The store a `QP_STORAGE` URL names: `file://PATH` or `s3://BUCKET[/PREFIX]`."""
    if url.startswith("file://"):
        return FileBlobStore.open(file_store_root(url))
    return await S3BlobStore.open(url, endpoint_url, region, exit_stack, profile, s3_timeout)


class StartupError(Exception):
    """A resource cannot be opened; the message is one line naming it."""


def lock_files(config: Config) -> list[tuple[Path, Path, str]]:
    """(lock file, what it guards, its setting): the database, and a file store's folder."""
    database = config.database_path
    locks = []
    if config.postgres_url is None:  # PostgreSQL: the server's own lock (qp/storage/postgres.py)
        locks.append((database.with_name(database.name + ".lock"), database, "QP_DATABASE"))
    if config.storage_url.startswith("file://"):
        root = file_store_root(config.storage_url)
        locks.append((root / ".qp-server.lock", root, "QP_STORAGE"))
    return locks


def claim_record(config: Config) -> dict[str, Any]:
    """What the lock files say of their holder: who it is, and what a repair beside it
    needs to know (its blob store)."""
    return {
        "pid": os.getpid(),
        "database": database_shown(config)
        if config.postgres_url
        else str(config.database_path.resolve()),
        "storage": storage_identity(config.storage_url),
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


class Processes(Protocol):
    """What differs between one server process on its database and several sharing one."""

    @property
    def peers(self) -> Peers:
        """Who else writes to the database."""
        ...

    def rate_counts(self, max_clients: int) -> Counts:
        """Where rate limits count, for at most `max_clients` clients."""
        ...

    def budget_accounts(
        self, clock: Callable[[], float], on_passed: OnPassed | None
    ) -> BudgetAccounts:
        """Where budgets keep what is spent and reserved."""
        ...

    def response_cache(self, max_bytes: int, clock: Callable[[], float]) -> ResponseCache:
        """Where the response cache keeps answers, at most `max_bytes` of them."""
        ...


class OneProcess:
    """SQLite: one server process, which counts and keeps its accounts in memory."""

    def __init__(self, db: SqliteDatabase):
        self.peers = SoleWriter(db)

    def rate_counts(self, max_clients: int) -> Counts:
        return MemoryCounts(time.time, max_clients)

    def budget_accounts(
        self, clock: Callable[[], float], on_passed: OnPassed | None
    ) -> BudgetAccounts:
        return MemoryAccounts(on_passed)

    def response_cache(self, max_bytes: int, clock: Callable[[], float]) -> ResponseCache:
        return MemoryResponseCache(max_bytes, clock)


class SeveralProcesses:
    """PostgreSQL: server processes sharing the database, counting and keeping their
    accounts there, each with a lease of `lease_seconds`."""

    def __init__(self, db: PostgresDatabase, lease_seconds: float):
        self._db = db
        self.peers = SharedPeers(db, lease_seconds)

    def rate_counts(self, max_clients: int) -> Counts:
        return SharedCounts(self._db, max_clients)

    def budget_accounts(
        self, clock: Callable[[], float], on_passed: OnPassed | None
    ) -> BudgetAccounts:
        peers = self.peers
        return SharedAccounts(self._db, peers.owner, peers.live_owners, clock, on_passed)

    def response_cache(self, max_bytes: int, clock: Callable[[], float]) -> ResponseCache:
        return SharedResponseCache(self._db, max_bytes, clock)


async def open_database(
    config: Config,
    reader_count: int = READER_COUNT,
    space: DiskSpace | None = None,
    *,
    serving: bool = True,
) -> Database:
    """The database QP_DATABASE names (see `open_processes`)."""
    db, _ = await open_processes(config, reader_count, space, serving=serving)
    return db


async def open_processes(
    config: Config,
    reader_count: int = READER_COUNT,
    space: DiskSpace | None = None,
    *,
    serving: bool = True,
) -> tuple[Database, Processes]:
    """The database QP_DATABASE names, and what its processes share: PostgreSQL for a
    postgresql:// URL (listening for the other servers' changes unless `serving` is
    false: the operators' tools), else SQLite."""
    if config.postgres_url is not None:
        try:
            postgres = await PostgresDatabase.open(
                config.postgres_url,
                config.database_pool,
                config.database_quick_pool,
                serving=serving,
            )
        except (*POSTGRES_FAILURES, ValueError, SchemaTooNew) as err:
            problem = redact(describe_failure(err), config.postgres_url)
            raise StartupError(f"QP_DATABASE {database_shown(config)}: {problem}") from None
        return postgres, SeveralProcesses(postgres, config.write_lease_seconds)
    make_room = space.release_reserve if space is not None else None
    try:
        sqlite = await SqliteDatabase.open(config.database_path, reader_count, make_room)
    except (sqlite3.Error, OSError, SchemaTooNew) as err:
        raise StartupError(f"QP_DATABASE {config.database_path}: {err}") from None
    return sqlite, OneProcess(sqlite)


async def open_storage(
    config: Config,
    stack: AsyncExitStack,
    reader_count: int = READER_COUNT,
    space: DiskSpace | None = None,
    *,
    serving: bool = True,
) -> tuple[Database, Processes, BlobStore]:
    """Open the database, then the blob store, both closed by `stack`; StartupError names
    the one that cannot be opened."""
    db, processes = await open_processes(config, reader_count, space, serving=serving)
    stack.push_async_callback(db.close)
    return db, processes, await open_configured_blob_store(config, stack)


async def open_configured_blob_store(config: Config, stack: AsyncExitStack) -> BlobStore:
    """The blob store QP_STORAGE names, closed by `stack`; StartupError when it cannot be
    opened."""
    try:
        return await open_blob_store(
            config.storage_url,
            config.s3_endpoint_url,
            config.aws_region,
            stack,
            s3_timeout=config.s3_timeout,
        )
    except StoreNotReady as err:
        problem = redact(str(err), config.s3_endpoint_url)
        raise StartupError(f"QP_STORAGE {mask_url(config.storage_url)}: {problem}") from None
