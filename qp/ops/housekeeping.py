"""What the server checks every second, in a task that must never die."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qp.chats.store import ChatStore
from qp.protection.blocks import load_blocks
from qp.protection.rate_limits import RateLimiter
from qp.storage.claim import Claim
from qp.storage.database import Database
from qp.storage.disk import DiskSpace
from qp.storage.peers import Peers

log = logging.getLogger("qp.housekeeping")


class Housekeeping:
    """What the server checks every second, in a task that must never die: each chore's
    failure is logged (once a minute at most) and the next round runs anyway."""

    ROUND_SECONDS = 1.0
    RESERVE_EVERY_ROUNDS = 10
    # Garbage is swept once a minute, or four times within a shorter write bound.
    SWEEP_EVERY_ROUNDS = 60
    EXPIRE_EVERY_ROUNDS = 60
    LOG_EVERY_SECONDS = 60.0

    def __init__(
        self,
        db: Database,
        peers: Peers,
        store: ChatStore,
        limiter: RateLimiter,
        space: DiskSpace,
        claims: list[Claim],
        record: dict[str, Any],
    ):
        self._db = db
        self._peers = peers
        self._store = store
        self._limiter = limiter
        self._space = space
        self._claims = claims
        self._record = record
        self._logged: dict[str, float] = {}
        bound = store.garbage.abandon_seconds
        self._sweep_every = max(1, min(self.SWEEP_EVERY_ROUNDS, int(bound / 4)))

    async def run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.ROUND_SECONDS)
            rounds += 1
            # First, and on a connection of its own: never behind the chores that need the pool.
            await self._chore("listen for other processes' changes", self._peers.keep_watching)
            await self._chore("follow outside changes", self._follow_changes_made_elsewhere)
            await self._chore("check the database file", self._check_files)
            if rounds % self.EXPIRE_EVERY_ROUNDS == 0:
                await self._chore("expire rate-limit counts", self._limiter.expire)
            if rounds % self._sweep_every == 0:
                await self._chore("delete chat blobs no row names", self._collect_garbage)
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
        if await self._peers.changed_elsewhere():
            self._store.forget_all()
            self._limiter.replace_blocks(await load_blocks(self._db))

    async def _collect_garbage(self) -> None:
        """Give up on writes past their bound; delete the blobs no row names."""
        await self._store.garbage.sweep()

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
