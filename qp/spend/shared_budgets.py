"""Budgets several server processes share through PostgreSQL, so a cap holds across all of
them: the accounts (spent and reserved per scope and period) and each reservation in
flight are rows, and a reservation is one transaction that reserves in every scope only
while each has room (the UPDATEs hold the accounts' rows until it commits).

Each reservation is settled exactly once: settling marks its row settled, and the accounts
change only in the transaction that marked it (a second settlement finds it settled and
changes nothing; one that finds no row knows the reservation was lost in a database crash,
and adds only the cost). A reservation nobody will settle is swept: one whose process's
lease expired (it died, or is paused, with the completion in flight) is taken as spent at
its estimate, with a ledger row saying so; one of this process that no request of its
holds (its answer was lost on the way back) is released. A swept row is kept a while, so a
settlement that comes late (the paused process resumed) replaces the estimate by the real
cost instead of adding to it, and its ledger row replaces the sweep's.

What `/api/usage` and the metrics show of the accounts is taken from the database every few
seconds and before each report (`refresh`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from qp.errors import StorageUnavailable
from qp.spend.budgets import (
    CAP_TOLERANCE_USD,
    DAY,
    MONTH,
    AccountsHere,
    Held,
    OnPassed,
    Periods,
    Reservation,
    Scope,
    tell_passed,
)
from qp.spend.ledger import INSERT_SWEPT
from qp.spend.record import CompletionRecord
from qp.storage.database import Database, Transaction

log = logging.getLogger("qp.spend.shared_budgets")

SEED = """
    INSERT INTO budget_accounts (kind, name, period, period_start, spent)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (kind, name, period, period_start) DO NOTHING
"""
# The accounts a request falls in, as arrays (one element per scope).
_WANTED = """
    wanted AS (
        SELECT * FROM unnest(:kinds::text[], :names::text[], :periods::text[],
                             :starts::float8[], :rooms::float8[])
            AS w(kind, name, period, period_start, room)
    ), held AS (
        SELECT a.kind, a.name, a.period, a.period_start, a.spent, a.reserved, w.room
        FROM budget_accounts a JOIN wanted w USING (kind, name, period, period_start)
        ORDER BY a.kind, a.name, a.period, a.period_start
        FOR UPDATE OF a
    )
"""
# One statement, so the accounts' rows are locked (always in one order, so two requests
# never wait for each other crosswise) only while it runs: reserve `amount` in every
# account if each has room, and note the reservation; else change nothing. Answers each
# account as it was before, with the reservation's id (NULL when refused or an account is
# missing).
RESERVE = f"""
    WITH {_WANTED}, verdict AS (
        SELECT COUNT(*) = :n AND COUNT(*) FILTER (WHERE spent + reserved + :amount <= room) = :n
            AS fits
        FROM held
    ), reserved AS (
        UPDATE budget_accounts a SET reserved = a.reserved + :amount
        FROM held h, verdict v
        WHERE v.fits AND a.kind = h.kind AND a.name = h.name AND a.period = h.period
          AND a.period_start = h.period_start
        RETURNING a.kind
    ), noted AS (
        INSERT INTO budget_reservations (owner, amount, accounts, record)
        SELECT :owner, :amount, :accounts, :record FROM verdict WHERE fits
        RETURNING id
    )
    SELECT kind, name, period, spent, reserved, room, (SELECT id FROM noted) FROM held
"""
OPEN_ACCOUNT = """
    INSERT INTO budget_accounts (kind, name, period, period_start) VALUES (?, ?, ?, ?)
    ON CONFLICT (kind, name, period, period_start) DO NOTHING
"""
# Settling or sweeping a reservation: its row first (so two settlements of one reservation
# queue on it, and the second finds it settled or swept), then its accounts. A settled row
# is kept a while, so that a settlement that finds no row at all knows the reservation was
# lost (a database crash forgot a commit that did not wait for the disk).
SETTLE = """
    WITH old AS (
        SELECT id, swept_at, settled_at FROM budget_reservations WHERE id = ? FOR UPDATE
    )
    UPDATE budget_reservations r SET settled_at = ? FROM old WHERE r.id = old.id
    RETURNING old.swept_at, old.settled_at
"""
SETTLE_LOST = """
    INSERT INTO budget_reservations (id, owner, amount, accounts, settled_at)
    OVERRIDING SYSTEM VALUE VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""
# A sweep takes what the ledger says the completion cost, if its row is there already.
SWEEP = """
    UPDATE budget_reservations r SET swept_at = ?
    WHERE id = ? AND swept_at IS NULL AND settled_at IS NULL
    RETURNING EXISTS (SELECT 1 FROM completions c WHERE c.reservation_id = r.id),
              (SELECT COALESCE(cost, 0) FROM completions c WHERE c.reservation_id = r.id)
"""
SETTLED_BY_SWEEP = "UPDATE budget_reservations SET settled_at = ? WHERE id = ?"
# Take `release` off what the accounts hold reserved and add `spend` to what they spent;
# answers each account as it is after.
MOVE = f"""
    WITH {_WANTED}, moved AS (
        UPDATE budget_accounts a
        SET reserved = GREATEST(0, a.reserved - :release), spent = GREATEST(0, a.spent + :spend)
        FROM held h
        WHERE a.kind = h.kind AND a.name = h.name AND a.period = h.period
          AND a.period_start = h.period_start
        RETURNING a.kind, a.name, a.period, a.spent, a.reserved
    )
    SELECT kind, name, period, spent, reserved FROM moved
"""
ADJUST = """
    UPDATE budget_accounts SET spent = GREATEST(0, spent + :delta)
    WHERE kind = :kind AND name = :name AND period = :period AND period_start = :start
    RETURNING spent, reserved
"""
# The reservations to sweep: those of processes whose lease expired, and this process's
# own made before `made_before` (the ones its requests hold are left out by the caller).
UNSETTLED = """
    SELECT id, owner, amount, accounts, record FROM budget_reservations
    WHERE swept_at IS NULL AND settled_at IS NULL
      AND (NOT (owner = ANY(:live::text[])) OR (owner = :me AND created_at < :made_before))
"""
FORGET_SETTLED = "DELETE FROM budget_reservations WHERE swept_at < ? OR settled_at < ?"
# The server's and apps' accounts in their current periods (clients' are many: they stay in
# the database).
STANDING = """
    SELECT kind, name, period, spent, reserved FROM budget_accounts
    WHERE kind IN ('server', 'app')
      AND ((period = 'day' AND period_start = ?) OR (period = 'month' AND period_start = ?))
"""
# Accounts of periods that ended are kept a while (a settlement may still reach one), then
# deleted: one row a client a day would otherwise pile up.
FORGET_ENDED = """
    DELETE FROM budget_accounts
    WHERE (period = 'day' AND period_start < ?) OR (period = 'month' AND period_start < ?)
"""
REFRESH_SECONDS = 5.0
FORGET_EVERY_ROUNDS = 120
# A reservation of this process that no request holds is released once it is this old
# (younger, its request may be between the database's answer and taking it).
ORPHAN_SECONDS = 30.0
# A settled reservation is remembered this long (a settlement retried while the database
# was down finds it settled), and a swept one this long (for a settlement that comes late).
SETTLED_KEPT_SECONDS = 86400.0
SWEPT_KEPT_SECONDS = 2 * 86400.0


# The owners of the process leases not expired yet (qp/storage/peers.py).
LiveOwners = Callable[[], Awaitable[set[str]]]


class SharedAccounts:
    """Budget accounts in the database several processes share; what the last `refresh`
    found of the server's and apps' is kept here too (for reports and metrics)."""

    def __init__(
        self,
        db: Database,
        owner: str,
        live_owners: LiveOwners,
        clock: Callable[[], float] = time.time,
        on_passed: OnPassed | None = None,
    ):
        self._db = db
        self._owner = owner
        self._live_owners = live_owners
        self._periods = Periods(clock)
        self._on_passed = on_passed
        self._mirror = AccountsHere()
        # The rows of the reservations this process's requests hold (not settled yet).
        self._held: set[int] = set()
        # Settlements the database refused (it was down): tried again by `refresh`.
        self._unsettled: list[tuple[Reservation, float]] = []
        # Releases of reservations whose request left while they were being made.
        self._releasing: set[asyncio.Task[None]] = set()

    async def start_from(self, spent: list[tuple[Scope, float, float]]) -> None:
        """Accounts for the current periods that do not exist yet start from what the
        ledger says they already spent (a first start on this database, an upgrade)."""
        rows = [(scope.kind, scope.name, scope.period, start, cost) for scope, start, cost in spent]
        await self._db.execute_write_many(SEED, rows)
        await self.refresh()

    async def reserve(
        self, held: list[Held], amount: float, record: CompletionRecord | None = None
    ) -> Reservation | Scope:
        for scope, _, cap in held:
            if amount > cap + CAP_TOLERANCE_USD:
                return scope
        if not held:
            return Reservation(amount)
        # A request whose client leaves while the reservation is being made is cancelled
        # then, not the reserving: what it reserved is released once that is known.
        reserving = asyncio.ensure_future(self._reserve(held, amount, record))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._release_unclaimed)
            raise

    async def _reserve(
        self, held: list[Held], amount: float, record: CompletionRecord | None
    ) -> Reservation | Scope:
        reserving = {
            **_arrays(held),
            "n": len(held),
            "amount": amount,
            "owner": self._owner,
            "accounts": _accounts_json(held),
            "record": None if record is None else _swept_record(record),
        }
        rows = await self._db.execute_write_returning(RESERVE, reserving, durable=False)
        if len(rows) < len(held):  # the first request of a period: open its accounts
            await self._db.execute_write_many(
                OPEN_ACCOUNT, [tuple(_key(scope, start).values()) for scope, start, _ in held]
            )
            rows = await self._db.execute_write_returning(RESERVE, reserving, durable=False)
        found = {Scope(kind, name, period): row for kind, name, period, *row in rows}
        if len(found) < len(held):
            raise StorageUnavailable("Database", "a budget account could not be opened")
        if rows[0][-1] is None:
            for scope, _, _ in held:
                spent, reserved, room, _ = found[scope]
                if spent + reserved + amount > room:
                    return scope
            raise StorageUnavailable("Database", "a budget reservation was not noted")
        row_id = int(rows[0][-1])
        self._held.add(row_id)
        for scope, start, _ in held:
            spent, reserved, _, _ = found[scope]
            self._take(scope, start, spent, reserved + amount)
        return Reservation(amount, held, row_id=row_id)

    def _release_unclaimed(self, reserving: asyncio.Future[Reservation | Scope]) -> None:
        if reserving.cancelled() or reserving.exception() is not None:
            return
        reservation = reserving.result()
        if isinstance(reservation, Reservation):
            release = asyncio.ensure_future(self.settle(reservation, 0.0))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)

    def _take(self, scope: Scope, start: float, spent: float, reserved: float) -> None:
        """Take what the database answered of an account into the mirror."""
        if scope.kind == "client":
            return  # clients' accounts are many: they stay in the database
        if start == self._periods.start(scope.period):
            account = self._mirror.current(scope, start)
            account.spent, account.reserved = float(spent), float(reserved)

    async def settle(self, reservation: Reservation, cost: float) -> None:
        if reservation.row_id is None:
            return
        # The mirror first, before any await, so what this process reports next (the
        # metrics, a report) already counts the completion as settled.
        for scope, start, _ in reservation.held:
            account = self._mirror.get(scope, start)
            if account is not None:
                account.reserved = max(0.0, account.reserved - reservation.amount)
                account.spent = max(0.0, account.spent + cost)
        try:
            await self._settle(reservation, cost)
        except StorageUnavailable as err:
            log.error("a budget reservation cannot be settled yet (%s); it will be retried", err)
            self._unsettled.append((reservation, cost))

    async def _settle(self, reservation: Reservation, cost: float) -> None:
        """Replace the reservation by what its completion cost, if nothing settled it yet;
        if a sweep took it as spent at its estimate, correct the estimate to `cost`. Safe
        to repeat: a settlement that reached the database changes nothing the second time."""
        row_id = reservation.row_id
        assert row_id is not None

        spend = cost

        async def settling(tx: Transaction) -> list[tuple[Any, ...]]:
            nonlocal spend
            release = reservation.amount
            found = await tx.fetchall(SETTLE, (row_id, time.time()))
            if not found:  # lost, and what it reserved with it: only the cost is new
                accounts = _accounts_json(reservation.held)
                lost = (row_id, self._owner, reservation.amount, accounts, time.time())
                if not await tx.fetchall(SETTLE_LOST, lost):
                    return []
                release = 0.0
            elif found[0][1] is not None:
                return []  # settled already
            elif found[0][0] is not None:  # swept: its estimate was taken as spent
                release, spend = 0.0, cost - reservation.amount
            return await tx.fetchall(MOVE, _moving(reservation.held, release, spend))

        rows = await self._db.write(settling, durable=False)
        self._held.discard(row_id)
        standing = {
            Scope(kind, name, period): (spent, reserved)
            for kind, name, period, spent, reserved in rows
        }
        for held in reservation.held:
            scope, start, _ = held
            if scope in standing:
                spent, reserved = standing[scope]
                self._take(scope, start, spent, reserved)
                tell_passed(self._on_passed, held, float(spent) - spend, float(spent), start)

    async def adjust(self, held: Held, delta: float) -> None:
        scope, start, _ = held
        rows = await self._db.execute_write_returning(
            ADJUST, {**_key(scope, start), "delta": delta}
        )
        if rows:
            after = float(rows[0][0])
            self._take(scope, start, after, rows[0][1])
            tell_passed(self._on_passed, held, after - delta, after, start)

    def standing(self, scope: Scope, start: float) -> tuple[float, float]:
        account = self._mirror.get(scope, start)
        return (0.0, 0.0) if account is None else (account.spent, account.reserved)

    def known(self) -> list[tuple[Scope, float]]:
        return self._mirror.known()

    async def refresh(self) -> None:
        """Settle what could not be settled before; take the accounts as they stand."""
        for reservation, cost in list(self._unsettled):
            await self._settle(reservation, cost)
            self._unsettled.remove((reservation, cost))
        day, month = self._periods.start(DAY), self._periods.start(MONTH)
        for kind, name, period, spent, reserved in await self._db.fetchall(STANDING, (day, month)):
            start = day if period == DAY else month
            account = self._mirror.current(Scope(kind, name, period), start)
            account.spent, account.reserved = float(spent), float(reserved)

    async def run(self) -> None:
        """Every few seconds: sweep the reservations nobody will settle, and take the
        accounts again (a task that must never die)."""
        rounds = 0
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            rounds += 1
            try:
                dead, orphans = await self.sweep(await self._live_owners())
                if dead:
                    log.warning(
                        "%d budget reservations of a server gone taken as spent at their estimate",
                        dead,
                    )
                if orphans:
                    log.warning("%d budget reservations no request held released", orphans)
                await self.refresh()
                if rounds % FORGET_EVERY_ROUNDS == 0:
                    await self.forget_ended()
            except StorageUnavailable as err:
                log.warning("the shared budgets wait for the database: %s", err)

    async def forget_ended(self) -> None:
        """Delete the accounts of days that ended over a day ago and months over 40 days,
        and the swept reservations no late settlement will come for any more."""
        day, month = self._periods.start(DAY), self._periods.start(MONTH)
        await self._db.execute_write(FORGET_ENDED, (day - 86400, month - 40 * 86400))
        await self._db.execute_write(
            FORGET_SETTLED,
            (time.time() - SWEPT_KEPT_SECONDS, time.time() - SETTLED_KEPT_SECONDS),
        )

    async def sweep(self, live_owners: set[str]) -> tuple[int, int]:
        """Take as spent at their estimate the reservations of processes whose lease
        expired (they died or stopped with the completion in flight), each with a ledger
        row; release this process's own that no request holds. Answers how many of each
        this call swept (another process sweeping the same rows sweeps each only once)."""
        unsettled = await self._db.fetchall(
            UNSETTLED,
            {
                "live": sorted(live_owners),
                "me": self._owner,
                "made_before": time.time() - ORPHAN_SECONDS,
            },
        )
        dead = orphans = 0
        for row_id, owner, amount, accounts, record in unsettled:
            if row_id in self._held:
                continue
            held = [
                (Scope(kind, name, period), float(start), math.inf)
                for kind, name, period, start in orjson.loads(accounts)
            ]
            gone = owner != self._owner
            if await self._sweep(int(row_id), held, float(amount), gone, record):
                dead, orphans = (dead + 1, orphans) if gone else (dead, orphans + 1)
        return dead, orphans

    async def _sweep(
        self,
        row_id: int,
        held: list[Held],
        amount: float,
        gone: bool,
        record: str | None,
    ) -> bool:
        """Sweep one reservation, unless another process did first: when its process is
        `gone`, as spent at its estimate, with a ledger row made of its `record` (a
        reservation from before reservations kept one has none); else released."""

        async def sweeping(tx: Transaction) -> bool:
            found = await tx.fetchall(SWEEP, (time.time(), row_id))
            if not found:
                return False
            ((in_ledger, cost),) = found
            if in_ledger:
                # Its completion's row came before its settlement: that is the settlement
                # (one that still comes finds it settled and changes nothing).
                await tx.execute(SETTLED_BY_SWEEP, (time.time(), row_id))
                await tx.fetchall(MOVE, _moving(held, amount, float(cost)))
                return True
            await tx.fetchall(MOVE, _moving(held, amount, amount if gone else 0.0))
            if gone and record is not None:
                started_at, app, model, payer, client_hash = orjson.loads(record)
                await tx.execute(
                    INSERT_SWEPT, (started_at, app, model, payer, amount, client_hash, row_id)
                )
            return True

        return await self._db.write(sweeping)


def _arrays(held: list[Held]) -> dict[str, list[Any]]:
    """The accounts of (scope, period start, cap) as the statements' arrays."""
    return {
        "kinds": [scope.kind for scope, _, _ in held],
        "names": [scope.name for scope, _, _ in held],
        "periods": [scope.period for scope, _, _ in held],
        "starts": [start for _, start, _ in held],
        "rooms": [cap + CAP_TOLERANCE_USD for _, _, cap in held],
    }


def _moving(held: list[Held], release: float, spend: float) -> dict[str, Any]:
    return {**_arrays(held), "release": release, "spend": spend}


def _swept_record(record: CompletionRecord) -> str:
    """What a sweep writes in the ledger of the completion (never its messages)."""
    skeleton = [record.started_at, record.app, record.model, record.payer, record.client_hash]
    return orjson.dumps(skeleton).decode()


def _accounts_json(held: list[Held]) -> str:
    """The accounts a reservation holds as its row keeps them (read back by `sweep`)."""
    return orjson.dumps([list(_key(scope, start).values()) for scope, start, _ in held]).decode()


def _key(scope: Scope, start: float) -> dict[str, object]:
    return {"kind": scope.kind, "name": scope.name, "period": scope.period, "start": start}
