"""Who else writes to this database: whether this process is alone, which processes are
alive, and hearing the changes the others make. One protocol, two implementations, chosen
with the database at start-up (qp/startup.py):

- SoleWriter (SQLite): one server process owns the file under its lock file
  (qp/storage/claim.py), so it is always alone; the operators' tools still write to the
  file directly, and their commits are seen by polling SQLite's data_version.
- SharedPeers (PostgreSQL): process leases, and what the others announce (LISTEN/NOTIFY,
  on the connection qp/storage/postgres.py keeps for it).

Leases: each server renews its lease every second. What a process holds in the database
for a while (budget reservations) names its lease; another process releases it only once
that lease has expired. Leases are compared by the hosts' clocks: keep them in sync (NTP).
A process also learns at each renewal whether any other process holds a live lease: while
it is alone, nobody else can change a chat behind its back, so its cache needs no checks
(ChatStore). A process that finds others when it starts waits JOIN_WAIT_SECONDS before it
serves, so that each of them has stopped trusting that it is alone. (The table keeps its
first name, `write_leases`.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from qp.errors import StorageUnavailable
from qp.storage.database import Transaction
from qp.storage.postgres import PostgresDatabase
from qp.storage.sqlite import SqliteDatabase

log = logging.getLogger("qp.storage.peers")

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

# Told the topic of each change another process made (see Transaction.notify); "" when
# anything may have changed.
ChangeListener = Callable[[str], None]


class Peers(Protocol):
    """The other processes writing to this database, as this one knows them."""

    # This process's name among them (its lease's).
    owner: str

    def alone(self) -> bool:
        """Whether no other process can have written to the database since the last check."""
        ...

    async def join(self) -> None:
        """At start-up, before serving; StorageUnavailable when the database is unreachable."""
        ...

    async def keep(self) -> None:
        """What keeps this process known to the others, in a task that must never die."""
        ...

    async def release(self) -> None:
        """At a clean stop: nothing of ours waits for this process to be found gone."""
        ...

    async def live_owners(self) -> set[str]:
        """The processes alive now (this one among them)."""
        ...

    async def changed_elsewhere(self) -> bool:
        """True when another process may have changed anything unheard since the last call."""
        ...

    def subscribe(self, listener: ChangeListener) -> None:
        """Tell `listener` the topic of each change another server process announces."""
        ...

    async def keep_watching(self) -> None:
        """Listen again for other processes' changes if the way to hear them was lost
        (housekeeping, every second)."""
        ...

    @property
    def watching(self) -> bool:
        """True while every change another process makes is heard (so a cache may be kept)."""
        ...


class SoleWriter:
    """The one server process on a SQLite file: alone, and hearing no announcements; the
    tools' commits are seen by `changed_elsewhere`, polled."""

    def __init__(self, db: SqliteDatabase):
        self.owner = uuid.uuid4().hex
        self._db = db
        self._data_version: int | None = None

    def alone(self) -> bool:
        return True

    async def join(self) -> None:
        """Nothing to join: the lock file is this process's claim (qp/storage/claim.py)."""

    async def keep(self) -> None:
        """Nothing to keep."""

    async def release(self) -> None:
        """Nothing to release."""

    async def live_owners(self) -> set[str]:
        return {self.owner}

    async def changed_elsewhere(self) -> bool:
        """True when another connection committed to the file since the last call."""
        version = await self._db.data_version()
        if version is None:
            return False
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    def subscribe(self, listener: ChangeListener) -> None:
        """Nothing to subscribe to: no other server process announces anything."""

    async def keep_watching(self) -> None:
        """Nothing: the tools' changes are seen by `changed_elsewhere`, polled."""

    @property
    def watching(self) -> bool:
        return True


class SharedPeers:
    """The server processes sharing a PostgreSQL database: this one's lease and the
    others', and what they announce."""

    def __init__(self, db: PostgresDatabase, seconds: float):
        self.owner = uuid.uuid4().hex
        self.seconds = seconds
        self._db = db
        # Monotonic time until which no other process can be writing.
        self._alone_until = 0.0
        self._changed = False
        self._subscribers: list[ChangeListener] = []
        db.on_change(self._tell)

    def alone(self) -> bool:
        return time.monotonic() < self._alone_until

    async def renew(self) -> None:
        """Extend the lease by `seconds` from now and look for other processes;
        StorageUnavailable when the database is unreachable (the lease then runs out)."""
        started = time.monotonic()

        async def renew_and_look(tx: Transaction) -> int:
            await tx.execute(RENEW, (self.owner, time.time() + self.seconds))
            ((others,),) = await tx.fetchall(OTHERS, (self.owner, time.time()))
            return int(others)

        # On the lease's own connection: requests waiting for one never delay a renewal.
        others = await self._db.write(renew_and_look, reserved=True)
        self._alone_until = started + ALONE_TRUST_SECONDS if others == 0 else 0.0

    async def join(self) -> None:
        """Take the lease; beside other processes, wait until every one of them knows this
        one is there before serving."""
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

    async def release(self) -> None:
        """The lease ends now."""
        await self._db.execute_write(RELEASE, (self.owner,))

    async def live_owners(self) -> set[str]:
        """The processes whose lease has not expired."""
        return {row[0] for row in await self._db.fetchall(LIVE, (time.time(),))}

    async def changed_elsewhere(self) -> bool:
        """True when anything may have changed unheard since the last call: a tool wrote,
        or the listening connection was lost."""
        changed, self._changed = self._changed, False
        return changed

    def subscribe(self, listener: ChangeListener) -> None:
        self._subscribers.append(listener)

    async def keep_watching(self) -> None:
        await self._db.listen_again()

    @property
    def watching(self) -> bool:
        return self._db.listening

    def _tell(self, topic: str) -> None:
        """Pass a change on; an empty topic (anything may have changed) also to housekeeping."""
        if not topic:
            self._changed = True
        for subscriber in self._subscribers:
            try:
                subscriber(topic)
            except Exception:
                log.exception("a change listener failed")
