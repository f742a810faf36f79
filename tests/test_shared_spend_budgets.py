"""Budgets on a shared PostgreSQL whatever the clients and the processes do: a reservation
is settled or released whatever moment its client leaves, settled exactly once however
many settle it, and a settlement that comes after a sweep corrects the estimate instead of
adding to it. Real server processes, a real PostgreSQL, the fake OpenRouter."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from qp.spend.budgets import DAY, Reservation, Scope
from qp.spend.ledger import insert_records
from qp.spend.record import CompletionRecord
from qp.spend.shared_budgets import ORPHAN_SECONDS
from qp.storage.postgres import PostgresDatabase
from tests.app_server import Database
from tests.fake_openrouter import FakeOpenRouter, Script, billed_stream
from tests.helpers import ADMIN_KEY, completion_request, shared_budget_book, wait_until
from tests.processes import PostgresServer, QPServer

RESERVE = 0.01  # each completion reserves this (the fake lists no prices)
# The shortest lease start-up allows: a paused process is taken for dead soon after.
LEASE_SECONDS = 3.0
SERVER_DAY = Scope("server", "", DAY)
# The reservations neither settled nor swept.
OPEN = "SELECT id FROM budget_reservations WHERE settled_at IS NULL AND swept_at IS NULL"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    fake = FakeOpenRouter().start()
    fake.models = []
    fake.scripts["slow"] = Script(headers_delay=0.5)
    yield fake
    fake.stop()


@pytest.fixture
def start_processes(tmp_path: Path, postgres: PostgresServer, fake: FakeOpenRouter) -> Iterator:
    started: list[QPServer] = []

    def start(count: int, **env: str) -> tuple[Database, list[QPServer]]:
        """`count` server processes on one new database, budgets on."""
        url = postgres.create_database()
        shared = {
            "QP_DATABASE": url,
            "ADMIN_KEY": ADMIN_KEY,
            "OPENROUTER_API_KEY": "server-key",
            "QP_OPENROUTER_URL": fake.url,
            "QP_BUDGET_DEFAULT_RESERVE_USD": f"{RESERVE:g}",
            "QP_BUDGET_SERVER_DAILY_USD": "1000",
            "QP_WRITE_LEASE_SECONDS": f"{LEASE_SECONDS:g}",
            **env,
        }
        for n in range(count):
            started.append(QPServer(tmp_path / f"p{len(started)}-{n}", shared).start())
        return Database(tmp_path, url), started[-count:]

    yield start
    for process in started:
        process.signal(signal.SIGCONT)  # a test that failed may have left one stopped
        process.stop()


def standing(database: Database) -> tuple[float, float]:
    """The server's daily account: spent and reserved."""
    rows = database.rows(
        "SELECT spent, reserved FROM budget_accounts WHERE kind = 'server' AND period = 'day'"
    )
    return (rows[0]["spent"], rows[0]["reserved"]) if rows else (0.0, 0.0)


def ledger_cost(database: Database) -> float:
    return database.rows("SELECT COALESCE(SUM(cost), 0) AS cost FROM completions")[0]["cost"]


def raw_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /api/completion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def test_clients_that_hang_up_at_any_moment_leave_no_reservation_behind(start_processes):
    """Each of 400 clients sends a whole completion request and closes its connection after
    a delay of its own, 0 to 500 ms in steps of 1.25 ms: some leave while their reservation
    is being made (on this machine's load, tens of milliseconds after sending). Then no
    reservation is left, each settled or released by its own request (the sweep of
    orphans never had to), nothing is held reserved, and what the account spent is what
    the ledger holds."""
    database, (server,) = start_processes(1)
    request = raw_request(server.port, orjson.dumps(completion_request("script:slow")))

    async def hang_up(n: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(n / 800)  # the adversary's timing, not a wait
        writer.transport.abort()

    for first in range(0, 400, 50):
        await asyncio.gather(*(hang_up(n) for n in range(first, first + 50)))

    def settled() -> bool:
        left = len(database.rows(OPEN))
        spent, reserved = standing(database)
        return left == 0 and reserved == 0 and spent == pytest.approx(ledger_cost(database))

    await wait_until(settled, 120, "every reservation settled, and the account the ledger's")
    # Each by its own request: none was left for the sweep of orphans to release.
    assert "no request held released" not in server.log()


async def test_a_paused_process_settles_once_correcting_the_estimate_its_sweep_took(
    start_processes, fake
):
    """A is stopped (SIGSTOP) past its lease with a completion in flight; B sweeps its
    reservation at the estimate, with a ledger row. A resumes and its completion ends: the
    account and the ledger both hold what it really cost, once."""
    gate = threading.Event()
    fake.scripts["gated"] = billed_stream(3, gate=gate)
    database, (one, _) = start_processes(2)  # the second sweeps the first's
    async with aiohttp.ClientSession(one.url) as http:

        async def ask() -> tuple[int, bytes]:
            async with http.post("/api/completion", json=completion_request("script:gated")) as r:
                return r.status, await r.read()

        asking = asyncio.ensure_future(ask())
        reserved = lambda: database.rows(OPEN)  # noqa: E731
        await wait_until(lambda: bool(reserved()), 10, "the completion's reservation")
        one.signal(signal.SIGSTOP)
        try:
            swept = "SELECT id FROM budget_reservations WHERE swept_at IS NOT NULL"
            await wait_until(lambda: bool(database.rows(swept)), 30, "B's sweep of A's")
            assert standing(database) == pytest.approx((RESERVE, 0.0))
            rows = database.rows("SELECT cost, outcome, cost_source FROM completions")
            assert rows == [{"cost": RESERVE, "outcome": "abandoned", "cost_source": "estimate"}]
        finally:
            one.signal(signal.SIGCONT)
        gate.set()
        status, body = await asking
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    billed = fake.generations[fake.last().generation_id].total_cost
    assert billed < RESERVE

    def corrected() -> bool:
        rows = database.rows("SELECT cost, outcome FROM completions")
        return not reserved() and rows == [{"cost": pytest.approx(billed), "outcome": "completed"}]

    await wait_until(corrected, 10, "A's own ledger row in place of the sweep's")
    assert standing(database) == pytest.approx((billed, 0.0))


@pytest.fixture
async def shared_db(postgres: PostgresServer):
    db = await PostgresDatabase.open(postgres.create_database(), serving=False)
    yield db
    await db.close()


async def test_two_survivors_sweeping_one_dead_process_take_its_estimate_once(shared_db):
    dead = shared_budget_book(shared_db, "dead-process")
    record = CompletionRecord("2026-12-02T00:00:00.000Z", "nwb-assistant", "m", "server")
    held = await dead.reserve([(SERVER_DAY, 10.0)], 0.25, record)
    assert isinstance(held, Reservation)
    survivors = [shared_budget_book(shared_db, name) for name in ("one", "two")]
    counts = await asyncio.gather(*(book.accounts.sweep({"one", "two"}) for book in survivors))
    assert sorted(counts) == [(0, 0), (1, 0)]
    await survivors[0].refresh()
    assert survivors[0].standing(SERVER_DAY) == (0.25, 0.0)
    assert await shared_db.fetchall("SELECT cost, outcome, reservation_id FROM completions") == [
        (0.25, "abandoned", held.row_id)
    ]
    # The dead process was only paused: its settlement corrects the estimate, once.
    await dead.settle(held, 0.05)
    await dead.settle(Reservation(held.amount, held.held, row_id=held.row_id), 0.05)
    record.cost, record.outcome, record.reservation_id = 0.05, "completed", held.row_id
    await insert_records(shared_db, [record])
    await survivors[0].refresh()
    assert survivors[0].standing(SERVER_DAY) == pytest.approx((0.05, 0.0))
    assert await shared_db.fetchall("SELECT cost, outcome FROM completions") == [
        (0.05, "completed")
    ]


async def test_a_reservation_settled_twice_at_once_is_settled_once(shared_db):
    book = shared_budget_book(shared_db, "one")
    held = await book.reserve([(SERVER_DAY, 10.0)], 0.25)
    assert isinstance(held, Reservation)
    twin = Reservation(held.amount, held.held, row_id=held.row_id)
    await asyncio.gather(book.settle(held, 0.1), book.settle(twin, 0.1))
    await book.refresh()
    assert book.standing(SERVER_DAY) == pytest.approx((0.1, 0.0))


async def test_a_reservation_of_this_process_no_request_holds_is_released(shared_db):
    """Its answer was lost on the way back: the process that made it does not know it.
    Once it is old enough, the process's sweep releases it (nothing spent)."""
    lost = await shared_budget_book(shared_db, "me").reserve([(SERVER_DAY, 10.0)], 0.25)
    assert isinstance(lost, Reservation)
    book = shared_budget_book(shared_db, "me")  # the same process, not holding it
    assert await book.accounts.sweep({"me"}) == (0, 0)  # too young: its request may be taking it
    await shared_db.execute_write(
        "UPDATE budget_reservations SET created_at = created_at - ?", (ORPHAN_SECONDS + 1,)
    )
    assert await book.accounts.sweep({"me"}) == (0, 1)
    await book.refresh()
    assert book.standing(SERVER_DAY) == (0.0, 0.0)
    assert await shared_db.fetchall("SELECT COUNT(*) FROM completions") == [(0,)]


async def test_a_dead_processs_reservation_from_before_records_is_still_taken_as_spent(shared_db):
    """A reservation made before reservations kept their ledger row's skeleton (an
    upgrade with completions in flight) is swept as spent all the same, with no row."""
    held = await shared_budget_book(shared_db, "old-process").reserve([(SERVER_DAY, 10.0)], 0.25)
    assert isinstance(held, Reservation)
    book = shared_budget_book(shared_db, "me")
    assert await book.accounts.sweep({"me"}) == (1, 0)
    await book.refresh()
    assert book.standing(SERVER_DAY) == (0.25, 0.0)
    assert await shared_db.fetchall("SELECT COUNT(*) FROM completions") == [(0,)]


async def test_a_settlement_whose_reservation_was_lost_adds_only_the_cost(shared_db):
    """A database crash forgot a reservation committed without waiting for the disk, and
    what it reserved with it: its settlement adds the cost, releases nothing, and a second
    settlement of it changes nothing."""
    book = shared_budget_book(shared_db, "one")
    kept = await book.reserve([(SERVER_DAY, 10.0)], 0.5)
    held = await book.reserve([(SERVER_DAY, 10.0)], 0.25)
    assert isinstance(kept, Reservation) and isinstance(held, Reservation)
    await shared_db.execute_write("DELETE FROM budget_reservations WHERE id = ?", (held.row_id,))
    await shared_db.execute_write("UPDATE budget_accounts SET reserved = reserved - 0.25")
    await book.settle(held, 0.1)
    await book.settle(Reservation(held.amount, held.held, row_id=held.row_id), 0.1)
    await book.refresh()
    assert book.standing(SERVER_DAY) == pytest.approx((0.1, 0.5))


async def test_a_sweep_takes_the_cost_the_ledger_already_has(shared_db):
    """The completion's ledger row was written, its settlement was not (the process died
    between): the sweep takes the ledger's cost, not the estimate, and writes no row."""
    dead = shared_budget_book(shared_db, "dead-process")
    record = CompletionRecord("2026-12-02T00:00:00.000Z", "nwb-assistant", "m", "server")
    held = await dead.reserve([(SERVER_DAY, 10.0)], 0.25, record)
    assert isinstance(held, Reservation)
    record.cost, record.outcome, record.reservation_id = 0.05, "completed", held.row_id
    await insert_records(shared_db, [record])
    book = shared_budget_book(shared_db, "me")
    assert await book.accounts.sweep({"me"}) == (1, 0)
    # Its process comes back and settles after all: that changes nothing more.
    await dead.settle(held, 0.05)
    await book.refresh()
    assert book.standing(SERVER_DAY) == pytest.approx((0.05, 0.0))
    assert await shared_db.fetchall("SELECT cost, outcome FROM completions") == [
        (0.05, "completed")
    ]


async def test_a_sweep_takes_nothing_spent_when_the_ledger_says_nothing_was_billed(shared_db):
    """Upstream refused the completion (its row has no cost), and the process died before
    settling: the sweep spends nothing, as the ledger says."""
    dead = shared_budget_book(shared_db, "dead-process")
    record = CompletionRecord("2026-12-02T00:00:00.000Z", "nwb-assistant", "m", "server")
    held = await dead.reserve([(SERVER_DAY, 10.0)], 0.25, record)
    assert isinstance(held, Reservation)
    record.status, record.outcome, record.reservation_id = 502, "upstream_error", held.row_id
    await insert_records(shared_db, [record])
    book = shared_budget_book(shared_db, "me")
    assert await book.accounts.sweep({"me"}) == (1, 0)
    await book.refresh()
    assert book.standing(SERVER_DAY) == (0.0, 0.0)
    assert await shared_db.fetchall("SELECT cost, outcome FROM completions") == [
        (None, "upstream_error")
    ]
