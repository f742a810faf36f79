"""Rate-limit counts shared by every server process on one PostgreSQL database, so a limit
of N per window admits at most N requests from a client across all of them.

Each request is one statement: the client's row for its class is counted up only while
both windows have room (a window that has moved on counts from nothing). Its commit does
not wait for the disk: a database crash may forget the last moment's counts, never more.
Rows whose hour is over, and refusals older than an hour, are deleted by housekeeping.

The table is bounded whatever the number of clients: each (client, class) falls in one of
`max_clients / BUCKET_ROWS` buckets by a hash, and a bucket holds at most BUCKET_ROWS rows.
The first count of a new (client, class) in a full bucket deletes the least recently
counted row there, so the table never holds more than `max_clients` rows (rounded up to a
whole bucket; two processes adding to one bucket at the same moment may pass it by a row
until the next). A client so forgotten starts its windows afresh, as past the memory's cap
(`forgotten` counts those whose hour was still running); below the bound a bucket
overflows only when BUCKET_ROWS of its clients are active in one hour, which with the
default bound takes a flood of tens of thousands of clients.
"""

from __future__ import annotations

import hashlib
import math

from qp.protection.rate_limits import (
    HOUR,
    MINUTE,
    REFUSAL_MEMORY_SECONDS,
    RateLimit,
)
from qp.storage.database import Database, Transaction

# A window without a limit: more requests than any hour holds.
UNLIMITED = 2**31 - 1
BUCKET_ROWS = 16

# A new (client, class) first makes room in its bucket: the rows beyond the BUCKET_ROWS - 1
# most recently counted go (the row counted, whose minute is the latest, stays last).
COUNT = """
    WITH evicted AS (
        DELETE FROM rate_counts
        WHERE NOT EXISTS (
                SELECT 1 FROM rate_counts WHERE client_hash = :client AND rate_class = :class)
          AND (client_hash, rate_class) IN (
                SELECT client_hash, rate_class FROM rate_counts WHERE bucket = :bucket
                ORDER BY minute DESC OFFSET :others)
        RETURNING hour
    )
    INSERT INTO rate_counts
        (client_hash, rate_class, bucket, minute, minute_count, hour, hour_count)
    VALUES (:client, :class, :bucket, :minute, 1, :hour, 1)
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
    RETURNING minute_count, (SELECT COUNT(*) FROM evicted WHERE hour = :hour)
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

    def __init__(self, db: Database, max_clients: int):
        self._db = db
        self._buckets = math.ceil(max_clients / BUCKET_ROWS)
        self.forgotten = 0

    def _bucket(self, client: str, rate_class: str) -> int:
        """The same in every process: a hash of the client and class, not Python's own."""
        digest = hashlib.blake2b(f"{client}/{rate_class}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self._buckets

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
            {
                **window,
                "minute": int(now // 60),
                "per_hour": per_hour,
                "per_minute": per_minute,
                "bucket": self._bucket(client, rate_class),
                "others": BUCKET_ROWS - 1,
            },
            durable=False,
        )
        if counted:
            self.forgotten += int(counted[0][1])
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
