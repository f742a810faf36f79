"""Budgets: caps on what the server's keys spend, held under concurrency by reservations.

Before a server- or app-paid completion goes upstream, its estimated cost is reserved in
every scope it falls in (the server's day and month, its app's day, its client's day) in
one step with no await inside: either every scope has room for it, or nothing is
reserved and the request is refused. When the completion ends, its reservation is
replaced by what it cost. So concurrent requests can pass a cap only by what the requests
in flight cost beyond their reservations.

Spent totals start from the ledger at start-up (what this day and month already cost) and
are kept in its accounts from then on: in memory for the one process on SQLite
(MemoryAccounts), in the database for several sharing PostgreSQL (SharedAccounts,
qp/spend/shared_budgets.py). A scope's period rolls over by the clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

from aiohttp import web

from qp.spend.ledger import SpentSince, spent_since
from qp.storage.database import Database
from qp.timestamps import format_epoch

if TYPE_CHECKING:
    from qp.policy.policy import Policy
    from qp.spend.record import CompletionRecord

DAY = "day"
MONTH = "month"
# Sums of float costs drift by ulps; a cap is passed only beyond this much.
CAP_TOLERANCE_USD = 1e-9


class Scope(NamedTuple):
    """One budget: whose spending (`kind`: server, app, client), which one (`name`: the
    app, the client hash), and over which period. A tuple: it is hashed several times
    per request."""

    kind: str
    name: str
    period: str

    def describe(self) -> str:
        """The budget as the 402 message names it (API.md, Budgets)."""
        if self.kind == "server":
            return f"The server's {'daily' if self.period == DAY else 'monthly'} budget"
        if self.kind == "app":
            return f"The daily budget of app {self.name}"
        return "Your daily allowance"

    @property
    def label(self) -> str:
        """A short name for logs and metrics: never the client hash."""
        if self.kind == "server":
            return f"server_{'daily' if self.period == DAY else 'monthly'}"
        return "app_daily" if self.kind == "app" else "client_daily"

    @property
    def named(self) -> str:
        """The label with the app named (alerts, and metrics of budgets the policy sets)."""
        return f"app:{self.name}" if self.kind == "app" else self.label


@dataclass
class _Account:
    period_start: float
    spent: float = 0.0
    reserved: float = 0.0


@dataclass(frozen=True)
class Refusal:
    scope: Scope
    resets_at: float
    retry_after: int

    @property
    def message(self) -> str:
        when = format_epoch(self.resets_at)
        return f"{self.scope.describe()} is used up; it resets at {when}"


@dataclass
class Reservation:
    """What one request holds in each of its scopes: (scope, period start, cap)."""

    amount: float
    held: list[tuple[Scope, float, float]] = field(default_factory=list)
    settled: bool = False
    row_id: int | None = None  # its row in a shared database (qp/spend/shared_budgets.py)


# Told when a scope's spending passes a threshold: scope, period start, percent, spent, cap.
OnPassed = Callable[[Scope, float, int, float, float], None]
THRESHOLDS = (50, 80, 100)


def crossed(before: float, after: float, cap: float) -> list[int]:
    """The thresholds (percent of `cap`) that spending from `before` to `after` passed."""
    if cap <= 0:
        return []
    return [t for t in THRESHOLDS if before < cap * t / 100 <= after]


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The start and end (epoch seconds) of the UTC day or calendar month holding `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == DAY:
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end_day = datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
        return start.timestamp(), end_day.timestamp()
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


class Periods:
    """The periods by a clock; each period's bounds found once, not per request."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        # period -> (start, end) of the current one: a comparison per request, not a date.
        self._bounds: dict[str, tuple[float, float]] = {}

    def bounds(self, period: str, now: float) -> tuple[float, float]:
        """The start and end of the period holding `now`."""
        bounds = self._bounds.get(period)
        if bounds is None or not bounds[0] <= now < bounds[1]:
            bounds = self._bounds[period] = period_bounds(period, now)
        return bounds

    def start(self, period: str) -> float:
        """The start of the current period."""
        return self.bounds(period, self.clock())[0]


class AccountsHere:
    """Accounts kept in this process, one per scope: its latest period's."""

    MAX_SCOPES = 200_000  # clients and apps are many: the oldest idle accounts go first

    def __init__(self) -> None:
        self._accounts: dict[Scope, _Account] = {}

    def current(self, scope: Scope, start: float) -> _Account:
        """The scope's account for the period starting at `start` (a new one rolls over)."""
        account = self._accounts.get(scope)
        if account is None or account.period_start != start:
            if account is None and len(self._accounts) >= self.MAX_SCOPES:
                self._forget_idle()
            account = self._accounts[scope] = _Account(start)
        return account

    def get(self, scope: Scope, start: float) -> _Account | None:
        """The scope's account if it is of the period starting at `start`."""
        account = self._accounts.get(scope)
        return account if account is not None and account.period_start == start else None

    def known(self) -> list[tuple[Scope, float]]:
        return [(scope, account.period_start) for scope, account in self._accounts.items()]

    def _forget_idle(self) -> None:
        idle = [s for s, a in self._accounts.items() if a.reserved == 0 and s.kind != "server"]
        for scope in idle[: max(1, len(idle) // 2)]:
            del self._accounts[scope]


# What a reservation holds in one scope: (scope, period start, cap).
Held = tuple[Scope, float, float]


class BudgetAccounts(Protocol):
    """Where spent and reserved are kept: in this process (MemoryAccounts, for the one
    process on SQLite) or in the database several share (SharedAccounts, on PostgreSQL,
    qp/spend/shared_budgets.py)."""

    async def start_from(self, spent: list[tuple[Scope, float, float]]) -> None:
        """At start-up: (scope, period start, spent) as the ledger has them."""
        ...

    async def reserve(
        self, held: list[Held], amount: float, record: CompletionRecord | None
    ) -> Reservation | Scope:
        """Reserve `amount` in every account at once, or in none: then answer the first
        scope without room."""
        ...

    async def settle(self, reservation: Reservation, cost: float) -> None:
        """Replace the reservation by what its completion cost (called once for each)."""
        ...

    async def adjust(self, held: Held, delta: float) -> None:
        """Add a cost found later to the account."""
        ...

    def standing(self, scope: Scope, start: float) -> tuple[float, float]:
        """Spent and reserved in the scope's period starting at `start`, as known here."""
        ...

    def known(self) -> list[tuple[Scope, float]]:
        """(scope, period start) of the accounts known here."""
        ...

    async def refresh(self) -> None:
        """Take the accounts as they stand now."""
        ...

    async def run(self) -> None:
        """Their chores, in a task that must never die (none in memory)."""
        ...


def tell_passed(
    on_passed: OnPassed | None, held: Held, before: float, after: float, start: float
) -> None:
    """Tell of each threshold the scope's spending passed from `before` to `after` in the
    period starting at `start` (clients' allowances raise no alerts)."""
    scope, _, cap = held
    if on_passed is not None and scope.kind != "client":
        for threshold in crossed(before, after, cap):
            on_passed(scope, start, threshold, after, cap)


class MemoryAccounts:
    """The accounts of the one process that spends (SQLite): kept in memory from what the
    ledger says at start-up. No await inside a reservation: concurrent requests see each
    other's reservations."""

    def __init__(self, on_passed: OnPassed | None = None):
        self._on_passed = on_passed
        self._here = AccountsHere()

    async def start_from(self, spent: list[tuple[Scope, float, float]]) -> None:
        for scope, start, cost in spent:
            self._here.current(scope, start).spent = cost

    async def reserve(
        self, held: list[Held], amount: float, record: CompletionRecord | None = None
    ) -> Reservation | Scope:
        for scope, start, cap in held:
            account = self._here.current(scope, start)
            if account.spent + account.reserved + amount > cap + CAP_TOLERANCE_USD:
                return scope
        for scope, start, _ in held:
            self._here.current(scope, start).reserved += amount
        return Reservation(amount, list(held))

    async def settle(self, reservation: Reservation, cost: float) -> None:
        for held in reservation.held:
            scope, start, _ = held
            account = self._here.get(scope, start)
            if account is None:
                continue  # the period rolled over meanwhile: its cost belongs to the old one
            account.reserved = max(0.0, account.reserved - reservation.amount)
            self._spend(held, account, cost)

    async def adjust(self, held: Held, delta: float) -> None:
        scope, start, _ = held
        self._spend(held, self._here.current(scope, start), delta)

    def _spend(self, held: Held, account: _Account, cost: float) -> None:
        before = account.spent
        account.spent = max(0.0, before + cost)
        tell_passed(self._on_passed, held, before, account.spent, account.period_start)

    def standing(self, scope: Scope, start: float) -> tuple[float, float]:
        account = self._here.get(scope, start)
        return (0.0, 0.0) if account is None else (account.spent, account.reserved)

    def known(self) -> list[tuple[Scope, float]]:
        return self._here.known()

    async def refresh(self) -> None:
        """Nothing to take: they are all here."""

    async def run(self) -> None:
        """No chores: nothing is left for anyone to sweep."""


class BudgetBook:
    """Spent and reserved per scope and period, in its accounts; reserve, then settle."""

    def __init__(self, accounts: BudgetAccounts, clock: Callable[[], float] = time.time):
        self.accounts = accounts
        self._clock = clock
        self._periods = Periods(clock)

    async def reserve(
        self,
        scopes: Iterable[tuple[Scope, float]],
        amount: float,
        record: CompletionRecord | None = None,
    ) -> Reservation | Refusal:
        """Reserve `amount` for the completion of `record` in every (scope, cap) at once, or
        refuse naming the first scope without room."""
        now = self._clock()
        held = [(scope, self._periods.bounds(scope.period, now)[0], cap) for scope, cap in scopes]
        found = await self.accounts.reserve(held, amount, record)
        if isinstance(found, Reservation):
            return found
        _, end = self._periods.bounds(found.period, now)
        return Refusal(found, end, max(1, math.ceil(end - now)))

    async def settle(self, reservation: Reservation, cost: float) -> None:
        """Replace the reservation by what the completion cost (once)."""
        if reservation.settled:
            return
        reservation.settled = True
        await self.accounts.settle(reservation, cost)

    async def adjust(self, scopes: Iterable[tuple[Scope, float]], delta: float, at: float) -> None:
        """A cost found later than it was settled: add the difference to each (scope, cap)
        whose current period holds `at` (when the completion started)."""
        now = self._clock()
        for scope, cap in scopes:
            start, end = self._periods.bounds(scope.period, now)
            if start <= at < end:
                await self.accounts.adjust((scope, start, cap), delta)

    def scopes_of(self, kind: str) -> list[Scope]:
        """The scopes of `kind` with an account in their current period."""
        now = self._clock()
        return [
            scope
            for scope, start in self.accounts.known()
            if scope.kind == kind and start == self._periods.bounds(scope.period, now)[0]
        ]

    async def refresh(self) -> None:
        """Take the accounts as they stand now."""
        await self.accounts.refresh()

    async def run(self) -> None:
        """The accounts' chores, in a task that must never die."""
        await self.accounts.run()

    def remaining(self, scope: Scope, cap: float) -> float:
        spent, reserved = self.standing(scope)
        return max(0.0, cap - spent - reserved)

    def report(self, scope: Scope, cap: float) -> dict[str, object]:
        """The budget as GET /api/usage shows it."""
        spent, reserved = self.standing(scope)
        _, end = self._periods.bounds(scope.period, self._clock())
        shown: dict[str, object] = {"scope": scope.kind}
        if scope.kind == "app":
            shown["app"] = scope.name
        shown.update(
            period=scope.period,
            cap=cap,
            spent=spent,
            reserved=reserved,
            remaining=self.remaining(scope, cap),
            resetsAt=format_epoch(end),
        )
        return shown

    def standing(self, scope: Scope) -> tuple[float, float]:
        """Spent and reserved in the scope's current period."""
        return self.accounts.standing(scope, self._periods.start(scope.period))


def budget_scopes(
    policy: Policy, payer: str, app: str | None, client: str
) -> list[tuple[Scope, float]]:
    """The (scope, cap) of every budget a completion paid by `payer` falls in; none for the
    user's own key."""
    if payer == "user":
        return []
    scopes: list[tuple[Scope, float]] = []
    if payer == "server":
        if policy.budget_server_daily_usd:
            scopes.append((Scope("server", "", DAY), policy.budget_server_daily_usd))
        if policy.budget_server_monthly_usd:
            scopes.append((Scope("server", "", MONTH), policy.budget_server_monthly_usd))
    if app_cap := policy.app_budget(app):
        scopes.append((Scope("app", app or "", DAY), app_cap))
    if policy.budget_client_daily_usd:
        scopes.append((Scope("client", client, DAY), policy.budget_client_daily_usd))
    return scopes


def estimate_cost(
    policy: Policy,
    price: tuple[float, float] | None,
    prompt_bytes: int,
    completion_tokens: int | None = None,
) -> float:
    """What a request reserves: its prompt (bytes / 3 as tokens) at the model's prompt
    price plus `completion_tokens` (the app's cap; else `reserve_completion_tokens`) at its
    completion price; the policy's `default_reserve_usd` for a model without a known price."""
    if price is None:
        return policy.default_reserve_usd
    prompt, completion = price
    tokens = policy.reserve_completion_tokens if completion_tokens is None else completion_tokens
    return prompt_bytes / 3 * prompt + tokens * completion


class OpenStreams:
    """Server- or app-paid streams each client holds open now."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def try_open(self, client: str, limit: int) -> bool:
        count = self._counts.get(client, 0)
        if limit and count >= limit:
            return False
        self._counts[client] = count + 1
        return True

    def close(self, client: str) -> None:
        count = self._counts.get(client, 0) - 1
        if count > 0:
            self._counts[client] = count
        else:
            self._counts.pop(client, None)


async def spent_in_periods(db: Database, now: float) -> SpentSince:
    """What the ledger says the day and month holding `now` already cost."""
    day_start, _ = period_bounds(DAY, now)
    month_start, _ = period_bounds(MONTH, now)
    return await spent_since(db, format_epoch(day_start), format_epoch(month_start))


async def open_budget_book(
    db: Database, accounts: BudgetAccounts, clock: Callable[[], float] = time.time
) -> BudgetBook:
    """A book whose accounts start from what the ledger says this day and month already
    cost (accounts the database keeps already are left as they are)."""
    now = clock()
    spent = await spent_in_periods(db, now)
    day, _ = period_bounds(DAY, now)
    month, _ = period_bounds(MONTH, now)
    rows = [
        (Scope("server", "", DAY), day, spent.server_day),
        (Scope("server", "", MONTH), month, spent.server_month),
    ]
    rows += [(Scope("app", app or "", DAY), day, cost) for app, cost in spent.apps_day.items()]
    rows += [(Scope("client", c, DAY), day, cost) for c, cost in spent.clients_day.items()]
    await accounts.start_from(rows)
    return BudgetBook(accounts, clock)


def budgets_in_force(book: BudgetBook, policy: Policy) -> list[tuple[Scope, float]]:
    """Every (scope, cap) in force: the server's, each named app's, and each other app that
    spent under the "*" cap today. Clients' allowances are many and stay out."""
    shown = []
    if policy.budget_server_daily_usd:
        shown.append((Scope("server", "", DAY), policy.budget_server_daily_usd))
    if policy.budget_server_monthly_usd:
        shown.append((Scope("server", "", MONTH), policy.budget_server_monthly_usd))
    apps = {app for app in policy.app_budgets if app != "*"}
    if "*" in policy.app_budgets:
        apps |= {scope.name for scope in book.scopes_of("app")}
    for app in sorted(apps):
        if cap := policy.app_budget(app):
            shown.append((Scope("app", app, DAY), cap))
    return shown


def budget_report(book: BudgetBook, policy: Policy) -> list[dict[str, object]]:
    """The budgets in force as GET /api/usage and `python -m qp budgets` show them."""
    return [book.report(scope, cap) for scope, cap in budgets_in_force(book, policy)]


# What the server's and the apps' keys spent and have reserved, per budget.
BUDGETS = web.AppKey("budgets", BudgetBook)
