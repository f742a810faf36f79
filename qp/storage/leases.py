"""Process leases: which server processes sharing a PostgreSQL database are alive.

Each server renews its lease every second. What a process holds in the database for a
while (budget reservations) names its lease; another process releases it only once that
lease has expired. Leases are compared by the hosts' clocks: keep them in sync (NTP).

A process also learns at each renewal whether any other process holds a live lease: while
it is alone, nobody else can change a chat behind its back, so its cache needs no checks
(ChatStore). A process that finds others when it starts waits JOIN_WAIT_SECONDS before
it serves, so that each of them has stopped trusting that it is alone.

SQLite needs none: one process owns the file under its lock file (qp/storage/claim.py).
(The table keeps its first name, `write_leases`.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from qp.errors import StorageUnavailable
from qp.storage.database import Database, Transaction

log = logging.getLogger("qp.storage.leases")

RENEW = """
    INSERT INTO write_leases (owner, expires_at) VALUES (?, ?)
    ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at
"""
LIVE = "SELECT owner FROM write_leases WHERE expires_at > ?"
OTHERS = "SELECT COUNT(*) FROM write_leases WHERE owner <> ? AND expires_at > ?"
RELEASE = "DELETE FROM write_leases WHERE owner = ?"
FORGET_EXPIRED = "DELETE FROM write_leases WHERE expires_at < ?"
RENEW_SECONDS = 1.0
# A renewal that found no other process lets this one trust it is alone this long; one
# that starts beside others waits longer than that before it serves.
ALONE_TRUST_SECONDS = 1.5
JOIN_WAIT_SECONDS = 2.0
# Expired leases are kept this long, then forgotten (what they held was released by then),
# by each live process once a minute.
KEPT_SECONDS = 24 * 3600.0
FORGET_EVERY_RENEWALS = 60


class ProcessLease:
    """This process's lease, and the other processes' as the database has them."""

    def __init__(self, db: Database, seconds: float):
        self.owner = uuid.uuid4().hex
        self.seconds = seconds
        self._db = db
        # Monotonic time until which no other process can be writing (forever on SQLite).
        self._alone_until = 0.0 if db.shared else math.inf

    def alone(self) -> bool:
        """Whether no other process can have written to the database since the last check."""
        return time.monotonic() < self._alone_until

    async def renew(self) -> None:
        """Extend the lease by `seconds` from now and look for other processes;
        StorageUnavailable when the database is unreachable (the lease then runs out)."""
        if not self._db.shared:
            return
        started = time.monotonic()

        async def renew_and_look(tx: Transaction) -> int:
            await tx.execute(RENEW, (self.owner, time.time() + self.seconds))
            ((others,),) = await tx.fetchall(OTHERS, (self.owner, time.time()))
            return int(others)

        # On the lease's own connection: requests waiting for one never delay a renewal.
        others = await self._db.write(renew_and_look, reserved=True)
        self._alone_until = started + ALONE_TRUST_SECONDS if others == 0 else 0.0

    async def join(self) -> None:
        """Take the lease at start-up; beside other processes, wait until every one of them
        knows this one is there before serving."""
        await self.renew()
        if not self.alone():
            await asyncio.sleep(JOIN_WAIT_SECONDS)

    async def keep(self) -> None:
        """Renew every second, in a task that must never die."""
        failing = False
        renewals = 0
        while True:
            try:
                await self.renew()
                renewals += 1
                if renewals % FORGET_EVERY_RENEWALS == 0:
                    await self._db.write(self._forget_expired, reserved=True)
                if failing:
                    log.warning("the process lease is renewed again")
                failing = False
            except StorageUnavailable as err:
                if not failing:
                    log.error("cannot renew the process lease: %s", err)
                failing = True
            await asyncio.sleep(RENEW_SECONDS)

    @staticmethod
    async def _forget_expired(tx: Transaction) -> None:
        await tx.execute(FORGET_EXPIRED, (time.time() - KEPT_SECONDS,))

    async def live_owners(self) -> set[str]:
        """The processes whose lease has not expired."""
        return {row[0] for row in await self._db.fetchall(LIVE, (time.time(),))}

    async def release(self) -> None:
        """At a clean stop: the lease ends now, so nothing of ours waits for it to expire."""
        if self._db.shared:
            await self._db.execute_write(RELEASE, (self.owner,))
