"""Rate-limit counts shared by every server process on one PostgreSQL database, so a limit
of N per window admits at most N requests from a client across all of them.

Each request is one statement: the client's row for its class is counted up only while
both windows have room (a window that has moved on counts from nothing). Its commit does
not wait for the disk: a database crash may forget the last moment's counts, never more.
Rows whose hour is over, and refusals older than an hour, are deleted by housekeeping.
"""

from __future__ import annotations

from qp.protection.rate_limits import (
    HOUR,
    MINUTE,
    REFUSAL_MEMORY_SECONDS,
    RateLimit,
)
from qp.storage.database import Database, Transaction

# A window without a limit: more requests than any hour holds.
UNLIMITED = 2**31 - 1

COUNT = """
    INSERT INTO rate_counts (client_hash, rate_class, minute, minute_count, hour, hour_count)
    VALUES (:client, :class, :minute, 1, :hour, 1)
    ON CONFLICT (client_hash, rate_class) DO UPDATE SET
        minute = excluded.minute,
        minute_count = CASE WHEN rate_counts.minute = excluded.minute
                            THEN rate_counts.minute_count + 1 ELSE 1 END,
        hour = excluded.hour,
        hour_count = CASE WHEN rate_counts.hour = excluded.hour
                          THEN rate_counts.hour_count + 1 ELSE 1 END
    WHERE (CASE WHEN rate_counts.hour = excluded.hour
                THEN rate_counts.hour_count ELSE 0 END) < :per_hour
      AND (CASE WHEN rate_counts.minute = excluded.minute
                THEN rate_counts.minute_count ELSE 0 END) < :per_minute
    RETURNING minute_count
"""
HOUR_COUNT = """
    SELECT hour_count FROM rate_counts
    WHERE client_hash = :client AND rate_class = :class AND hour = :hour
"""
REFUSED = """
    WITH noted AS (INSERT INTO rate_refusals (client_hash, refused_at) VALUES (:client, :now))
    SELECT COUNT(*) + 1 FROM rate_refusals WHERE client_hash = :client AND refused_at > :since
"""
FORGET_COUNTS = "DELETE FROM rate_counts WHERE client_hash = ?"
FORGET_REFUSALS = "DELETE FROM rate_refusals WHERE client_hash = ?"
EXPIRE_COUNTS = "DELETE FROM rate_counts WHERE hour < ?"
EXPIRE_REFUSALS = "DELETE FROM rate_refusals WHERE refused_at < ?"


class SharedCounts:
    """Counts in the database every server process shares."""

    tracked = 0  # nothing held in this process's memory
    forgotten = 0

    def __init__(self, db: Database):
        self._db = db

    async def count(self, client: str, rate_class: str, limit: RateLimit, now: float) -> str | None:
        per_hour = UNLIMITED if limit.per_hour is None else limit.per_hour
        per_minute = UNLIMITED if limit.per_minute is None else limit.per_minute
        if per_hour == 0:
            return HOUR
        if per_minute == 0:
            return MINUTE
        window = {"client": client, "class": rate_class, "hour": int(now // 3600)}
        counted = await self._db.execute_write_returning(
            COUNT,
            {**window, "minute": int(now // 60), "per_hour": per_hour, "per_minute": per_minute},
            durable=False,
        )
        if counted:
            return None
        # Refused: which window is used up decides the message (the hour's comes first).
        rows = await self._db.fetchall(HOUR_COUNT, window)
        return HOUR if rows and rows[0][0] >= per_hour else MINUTE

    async def refused(self, client: str, now: float) -> int:
        rows = await self._db.execute_write_returning(
            REFUSED,
            {"client": client, "now": now, "since": now - REFUSAL_MEMORY_SECONDS},
            durable=False,
        )
        return int(rows[0][0])

    async def forget(self, client: str) -> None:
        async def forget(tx: Transaction) -> None:
            await tx.execute(FORGET_COUNTS, (client,))
            await tx.execute(FORGET_REFUSALS, (client,))

        await self._db.write(forget)

    def forget_here(self, client: str) -> None:
        """Nothing: this process holds nothing of it."""

    async def expire(self, now: float) -> None:
        """Delete the counts of hours that are over and refusals older than an hour."""
        await self._db.execute_write(EXPIRE_COUNTS, (int(now // 3600),))
        await self._db.execute_write(EXPIRE_REFUSALS, (now - REFUSAL_MEMORY_SECONDS,))
