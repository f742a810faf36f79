"""Budgets several server processes share through PostgreSQL, so a cap holds across all of
them: the accounts (spent and reserved per scope and period) and each reservation in
flight are rows, and a reservation is one transaction that reserves in every scope only
while each has room (the UPDATEs hold the accounts' rows until it commits).

A reservation names its process's write lease; one whose process died is settled at its
estimate by whichever process sweeps it, as an unanswered completion would be. What
`/api/usage` and the metrics show of the accounts is taken from the database every few
seconds and before each report (`refresh`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from qp.errors import StorageUnavailable
from qp.spend.budgets import (
    CAP_TOLERANCE_USD,
    DAY,
    MONTH,
    BudgetBook,
    OnPassed,
    Refusal,
    Reservation,
    Scope,
    period_bounds,
    spent_in_periods,
)
from qp.storage.database import Database
from qp.storage.leases import live_owners

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
        INSERT INTO budget_reservations (owner, amount, accounts)
        SELECT :owner, :amount, :accounts FROM verdict WHERE fits
        RETURNING id
    )
    SELECT kind, name, period, spent, reserved, room, (SELECT id FROM noted) FROM held
"""
OPEN_ACCOUNT = """
    INSERT INTO budget_accounts (kind, name, period, period_start) VALUES (?, ?, ?, ?)
    ON CONFLICT (kind, name, period, period_start) DO NOTHING
"""
# Replace a reservation by what its completion cost, in one statement; answers each
# account as it is after.
SETTLE = f"""
    WITH {_WANTED}, settled AS (
        UPDATE budget_accounts a
        SET reserved = GREATEST(0, a.reserved - :amount), spent = GREATEST(0, a.spent + :cost)
        FROM held h
        WHERE a.kind = h.kind AND a.name = h.name AND a.period = h.period
          AND a.period_start = h.period_start
        RETURNING a.kind, a.name, a.period, a.spent, a.reserved
    ), forgotten AS (
        DELETE FROM budget_reservations WHERE id = :id
    )
    SELECT kind, name, period, spent, reserved FROM settled
"""
ADJUST = """
    UPDATE budget_accounts SET spent = GREATEST(0, spent + :delta)
    WHERE kind = :kind AND name = :name AND period = :period AND period_start = :start
    RETURNING spent, reserved
"""
RESERVATIONS = "SELECT id, owner, amount, accounts FROM budget_reservations"
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


class SharedBudgetBook(BudgetBook):
    """A BudgetBook whose accounts live in the shared database; the accounts in memory are
    what the last `refresh` found (for reports and metrics)."""

    def __init__(
        self,
        db: Database,
        owner: str,
        clock: Callable[[], float] = time.time,
        on_passed: OnPassed | None = None,
    ):
        super().__init__(clock, on_passed)
        self._db = db
        self._owner = owner
        # Settlements the database refused (it was down): tried again by `refresh`.
        self._unsettled: list[tuple[Reservation, float]] = []

    async def seed(self) -> None:
        """Accounts for the current periods that do not exist yet start from what the
        ledger says they already spent (a first start on this database, an upgrade)."""
        now = self._clock()
        spent = await spent_in_periods(self._db, now)
        day, _ = period_bounds(DAY, now)
        month, _ = period_bounds(MONTH, now)
        rows = [
            ("server", "", DAY, day, spent.server_day),
            ("server", "", MONTH, month, spent.server_month),
        ]
        rows += [("app", app or "", DAY, day, cost) for app, cost in spent.apps_day.items()]
        rows += [("client", client, DAY, day, cost) for client, cost in spent.clients_day.items()]
        await self._db.execute_write_many(SEED, rows)
        await self.refresh()

    async def reserve(
        self, scopes: Iterable[tuple[Scope, float]], amount: float
    ) -> Reservation | Refusal:
        now = self._clock()
        held = [(scope, self._period(scope.period, now)[0], cap) for scope, cap in scopes]
        for scope, _, cap in held:
            if amount > cap + CAP_TOLERANCE_USD:
                return self._refusal(scope, now)
        if not held:
            return Reservation(amount)

        accounts = orjson.dumps([list(_key(scope, start).values()) for scope, start, _ in held])
        reserving = {
            **_arrays(held),
            "n": len(held),
            "amount": amount,
            "owner": self._owner,
            "accounts": accounts.decode(),
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
                    return self._refusal(scope, now)
            raise StorageUnavailable("Database", "a budget reservation was not noted")
        for scope, start, _ in held:
            spent, reserved, _, _ = found[scope]
            self._mirror(scope, start, spent, reserved + amount)
        return Reservation(amount, held, row_id=int(rows[0][-1]))

    def _mirror(self, scope: Scope, start: float, spent: float, reserved: float) -> None:
        """Take what the database answered of an account (the metrics read the mirror)."""
        if scope.kind == "client":
            return  # clients' accounts are many: they stay in the database
        account = self._account(scope, self._clock())
        if account.period_start == start:
            account.spent, account.reserved = float(spent), float(reserved)

    def _refusal(self, scope: Scope, now: float) -> Refusal:
        _, end = self._period(scope.period, now)
        return Refusal(scope, end, max(1, math.ceil(end - now)))

    async def settle(self, reservation: Reservation, cost: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.row_id is None:
            return
        # The mirror first, before any await, so what this process reports next (the
        # metrics, a report) already counts the completion as settled.
        for scope, start, _ in reservation.held:
            account = self._accounts.get(scope)
            if account is not None and account.period_start == start:
                account.reserved = max(0.0, account.reserved - reservation.amount)
                account.spent = max(0.0, account.spent + cost)
        try:
            await self._settle(reservation, cost)
        except StorageUnavailable as err:
            log.error("a budget reservation cannot be settled yet (%s); it will be retried", err)
            self._unsettled.append((reservation, cost))

    async def _settle(self, reservation: Reservation, cost: float) -> None:
        settling = {
            **_arrays(reservation.held),
            "amount": reservation.amount,
            "cost": cost,
            "id": reservation.row_id,
        }
        rows = await self._db.execute_write_returning(SETTLE, settling, durable=False)
        standing = {
            Scope(kind, name, period): (spent, reserved)
            for kind, name, period, spent, reserved in rows
        }
        for scope, start, cap in reservation.held:
            if scope in standing:
                spent, reserved = standing[scope]
                self._mirror(scope, start, spent, reserved)
                self._tell_passed(scope, start, float(spent) - cost, float(spent), cap)

    async def adjust(self, scopes: Iterable[tuple[Scope, float]], delta: float, at: float) -> None:
        now = self._clock()
        for scope, cap in scopes:
            start, end = self._period(scope.period, now)
            if not start <= at < end:
                continue
            rows = await self._db.execute_write_returning(
                ADJUST, {**_key(scope, start), "delta": delta}
            )
            if rows:
                after = float(rows[0][0])
                self._mirror(scope, start, after, rows[0][1])
                self._tell_passed(scope, start, after - delta, after, cap)

    async def refresh(self) -> None:
        """Settle what could not be settled before; take the accounts as they stand."""
        for reservation, cost in list(self._unsettled):
            await self._settle(reservation, cost)
            self._unsettled.remove((reservation, cost))
        now = self._clock()
        day, _ = self._period(DAY, now)
        month, _ = self._period(MONTH, now)
        for kind, name, period, spent, reserved in await self._db.fetchall(STANDING, (day, month)):
            account = self._account(Scope(kind, name, period), now)
            account.spent, account.reserved = float(spent), float(reserved)

    async def keep_fresh(self) -> None:
        """Every few seconds: settle the reservations of processes gone, and take the
        accounts again (a task that must never die)."""
        rounds = 0
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            rounds += 1
            try:
                owners = await live_owners(self._db)
                if owners is not None and await self.settle_abandoned(owners):
                    log.warning("settled at their estimate the reservations of a server gone")
                await self.refresh()
                if rounds % FORGET_EVERY_ROUNDS == 0:
                    await self.forget_ended()
            except StorageUnavailable as err:
                log.warning("the shared budgets wait for the database: %s", err)

    async def forget_ended(self) -> None:
        """Delete the accounts of days that ended over a day ago and months over 40 days."""
        now = self._clock()
        day, _ = self._period(DAY, now)
        month, _ = self._period(MONTH, now)
        await self._db.execute_write(FORGET_ENDED, (day - 86400, month - 40 * 86400))

    async def settle_abandoned(self, live_owners: set[str]) -> int:
        """Settle at their estimate the reservations of processes whose lease expired (they
        died with the completion in flight); answers how many."""
        settled = 0
        for row_id, owner, amount, accounts in await self._db.fetchall(RESERVATIONS):
            if owner in live_owners:
                continue
            held = [
                (Scope(kind, name, period), float(start), math.inf)
                for kind, name, period, start in orjson.loads(accounts)
            ]
            await self._settle(Reservation(float(amount), held, row_id=int(row_id)), float(amount))
            settled += 1
        return settled


def _arrays(held: list[tuple[Scope, float, float]]) -> dict[str, list[Any]]:
    """The accounts of (scope, period start, cap) as the statements' arrays."""
    return {
        "kinds": [scope.kind for scope, _, _ in held],
        "names": [scope.name for scope, _, _ in held],
        "periods": [scope.period for scope, _, _ in held],
        "starts": [start for _, start, _ in held],
        "rooms": [cap + CAP_TOLERANCE_USD for _, _, cap in held],
    }


def _key(scope: Scope, start: float) -> dict[str, object]:
    return {"kind": scope.kind, "name": scope.name, "period": scope.period, "start": start}
