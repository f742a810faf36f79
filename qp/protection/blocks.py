"""Blocks: clients refused for 24 hours after repeated rate-limit violations, kept in the
database so a restart never lifts one; and the rate limiter that starts from them and, on
a database several processes share, hears of the blocks the others make or lift."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from qp.errors import StorageUnavailable
from qp.protection.rate_limits import Counts, RateLimiter
from qp.storage.database import Database, Transaction
from qp.storage.peers import Peers
from qp.timestamps import format_epoch, utc_now_iso

ACTIVE = """
    SELECT client_hash, blocked_at, blocked_until FROM blocks WHERE blocked_until > ?
    ORDER BY blocked_until
"""
# A page of the blocks in force, by client hash after a cursor (the primary key's order).
PAGE = """
    SELECT client_hash, blocked_at, blocked_until FROM blocks
    WHERE client_hash > ? AND blocked_until > ?
    ORDER BY client_hash LIMIT ?
"""
SAVE = """
    INSERT INTO blocks (client_hash, blocked_at, blocked_until) VALUES (?, ?, ?)
    ON CONFLICT (client_hash) DO UPDATE SET
        blocked_at = excluded.blocked_at, blocked_until = excluded.blocked_until
"""
FIND = "SELECT 1 FROM blocks WHERE client_hash = ?"
DELETE = "DELETE FROM blocks WHERE client_hash = ?"
# The topic other processes hear when a block is made or lifted.
CHANGED = "blocks"

log = logging.getLogger("qp.protection.blocks")


async def active_blocks(db: Database, now: str) -> list[tuple[str, str, str]]:
    """(client hash, blocked at, blocked until) of the blocks not yet over."""
    return [(row[0], row[1], row[2]) for row in await db.fetchall(ACTIVE, (now,))]


async def blocks_page(
    db: Database, now: str, after: str, limit: int
) -> tuple[list[tuple[str, str, str]], str | None]:
    """Up to `limit` blocks in force whose client hash sorts after `after`, and the cursor
    of the next page (None: this was the last)."""
    rows = await db.fetchall(PAGE, (after, now, limit + 1))
    found = [(row[0], row[1], row[2]) for row in rows[:limit]]
    return found, found[-1][0] if len(rows) > limit else None


async def save_block(db: Database, client_hash: str, blocked_at: str, blocked_until: str) -> None:
    async def save(tx: Transaction) -> None:
        await tx.execute(SAVE, (client_hash, blocked_at, blocked_until))
        await tx.notify(CHANGED)

    await db.write(save)


async def lift_block(db: Database, limiter: RateLimiter, client_hash: str) -> bool:
    """Lift a client's block, the one way every operator's tool does it (the admin route
    behind the page, `python -m qp blocks lift`); False when there is none. The client's
    counts and refusals are forgotten first, while the block still holds (nothing counts
    it anew meanwhile), so its next refusal cannot block it again; then the block goes
    and the other processes are told, and forget what they counted of it."""
    if await db.fetchone(FIND, (client_hash,)) is None:
        return False
    await limiter.forget(client_hash)

    async def delete(tx: Transaction) -> bool:
        if await tx.execute(DELETE, (client_hash,)) == 0:
            return False  # lifted meanwhile by someone else
        await tx.notify(CHANGED)
        return True

    async def delete_then_unblock() -> bool:
        lifted = await db.write(delete)
        limiter.unblock(client_hash)
        return lifted

    # Shielded: a lift whose caller leaves while it commits still ends in the unblock here
    # (this process does not hear its own commits), not in a block only it enforces.
    lifting = asyncio.ensure_future(delete_then_unblock())
    lifting.add_done_callback(_heard)
    return await asyncio.shield(lifting)


def _heard(task: asyncio.Future[bool]) -> None:
    """A lift's outcome, marked heard: once its caller left, there is no one to tell."""
    if not task.cancelled():
        task.exception()


async def load_blocks(db: Database) -> dict[str, float]:
    """Client hash -> blocked until (epoch seconds), for the blocks in force."""
    return {
        client: datetime.fromisoformat(until).timestamp()
        for client, _, until in await active_blocks(db, utc_now_iso())
    }


async def open_rate_limiter(db: Database, counts: Counts, peers: Peers) -> RateLimiter:
    """A limiter on `counts` that starts with the blocks in force, saves new ones to the
    database, and takes them again whenever one of its `peers` announces a change of
    blocks."""
    blocks = await load_blocks(db)

    async def keep(client: str, until: float) -> None:
        await save_block(db, client, utc_now_iso(), format_epoch(until))

    limiter = RateLimiter(blocks, keep, counts=counts)
    peers.subscribe(BlocksFollower(db, limiter).heard)
    return limiter


class BlocksFollower:
    """Takes the blocks in force from the database again each time another process
    announces a change of blocks: one reload at a time, and one more if a change came
    meanwhile. (A change of anything, from the tools or a lost listener, is housekeeping's:
    it reloads the blocks within a second, as on SQLite.)"""

    def __init__(self, db: Database, limiter: RateLimiter):
        self._db = db
        self._limiter = limiter
        self._again = False
        self._task: asyncio.Task[None] | None = None

    def heard(self, topic: str) -> None:
        if topic != CHANGED:
            return
        self._again = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while self._again:
            self._again = False
            try:
                self._limiter.replace_blocks(await load_blocks(self._db))
            except StorageUnavailable as err:
                # Housekeeping takes them again after its next outside change.
                log.error("cannot take the blocks in force again: %s", err)
                return
