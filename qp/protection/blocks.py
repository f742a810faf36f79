"""Blocks: clients refused for 24 hours after repeated rate-limit violations, kept in SQLite
so a restart never lifts one; and the rate limiter that starts from them."""

from __future__ import annotations

from datetime import datetime

from qp.protection.rate_limits import RateLimiter
from qp.storage.database import Database
from qp.timestamps import format_epoch, utc_now_iso

ACTIVE = """
    SELECT client_hash, blocked_at, blocked_until FROM blocks WHERE blocked_until > ?
    ORDER BY blocked_until
"""
SAVE = """
    INSERT INTO blocks (client_hash, blocked_at, blocked_until) VALUES (?, ?, ?)
    ON CONFLICT (client_hash) DO UPDATE SET
        blocked_at = excluded.blocked_at, blocked_until = excluded.blocked_until
"""
DELETE = "DELETE FROM blocks WHERE client_hash = ?"


async def active_blocks(db: Database, now: str) -> list[tuple[str, str, str]]:
    """(client hash, blocked at, blocked until) of the blocks not yet over."""
    return [(row[0], row[1], row[2]) for row in await db.fetchall(ACTIVE, (now,))]


async def save_block(db: Database, client_hash: str, blocked_at: str, blocked_until: str) -> None:
    await db.execute_write(SAVE, (client_hash, blocked_at, blocked_until))


async def delete_block(db: Database, client_hash: str) -> bool:
    return await db.execute_write(DELETE, (client_hash,)) > 0


async def load_blocks(db: Database) -> dict[str, float]:
    """Client hash -> blocked until (epoch seconds), for the blocks in force."""
    return {
        client: datetime.fromisoformat(until).timestamp()
        for client, _, until in await active_blocks(db, utc_now_iso())
    }


async def open_rate_limiter(db: Database) -> RateLimiter:
    """A limiter that starts with the blocks in force and saves new ones to the database."""
    blocks = await load_blocks(db)

    async def keep(client: str, until: float) -> None:
        await save_block(db, client, utc_now_iso(), format_epoch(until))

    return RateLimiter(blocks, keep)
