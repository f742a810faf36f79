"""Budgets on what the server's and the apps' keys spend: reservations that hold under
concurrency, the 402 and 429 of API.md check 9, and the ledger's cost for every stream."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest
from aiohttp import web

from qp.spend.budgets import (
    BUDGETS,
    DAY,
    MONTH,
    BudgetBook,
    MemoryAccounts,
    Refusal,
    Reservation,
    Scope,
)
from qp.spend.prices import PRICES, parse_model_list
from qp.storage.postgres import PostgresDatabase
from tests.app_server import AppServer, StartServer
from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import (
    call,
    completion_request,
    ledger,
    run_qp,
    shared_budget_book,
    wait_for_log,
    wait_until,
)

pytestmark = pytest.mark.on_both_databases

CHEAP = "openai/gpt-4.1-mini"
KEYS = {"OPENROUTER_API_KEY": "server-key", "OPENROUTER_API_KEY_BIDS_ASSISTANT": "bids-key"}
# Each request reserves 0.01 USD (no price known for the model); each costs 0.00042.
RESERVE = {"QP_BUDGET_DEFAULT_RESERVE_USD": "0.01"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    fake = FakeOpenRouter().start()
    # A completion that takes a second before answering: its reservation is held meanwhile.
    fake.scripts["slow"] = Script(headers_delay=1.0)
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def no_model_prices(fake: FakeOpenRouter) -> None:
    """Each test starts with a model list without prices; the price tests set their own."""
    fake.models = []
    fake.models_status = 200


async def start(
    start_server: StartServer, fake: FakeOpenRouter, clock: Clock | None = None, **env: str
) -> AppServer:
    clocked = {"clock": clock} if clock else {}
    return await start_server(
        **clocked, **{"QP_OPENROUTER_URL": fake.url, **KEYS, **RESERVE, **env}
    )


async def ask(server: AppServer, request: dict, headers: dict | None = None) -> tuple:
    """Status, Retry-After and body (what arrived of it: a stream may be cut)."""
    async with server.client.post("/api/completion", json=request, headers=headers) as response:
        try:
            body = await response.read()
        except aiohttp.ClientPayloadError:
            body = b""
        return response.status, response.headers.get("Retry-After"), body


def nothing_reserved(server: AppServer) -> bool:
    """Every reservation settled: in memory, or in the shared database's rows."""
    if server.database.postgres_url is None:
        return server.app[BUDGETS].standing(Scope("server", "", DAY))[1] == 0
    return not server.database.rows("SELECT id FROM budget_reservations WHERE settled_at IS NULL")


def tomorrow() -> str:
    return (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00.000Z")


def exhausted(budget: str) -> dict:
    return {
        "error": "Budget exhausted",
        "message": f"{budget} is used up; it resets at {tomorrow()}",
    }


async def test_a_daily_cap_worth_ten_reservations_lets_exactly_ten_of_a_hundred_through(
    start_server, fake
):
    server = await start(start_server, fake, QP_BUDGET_SERVER_DAILY_USD="0.1")
    before = len(fake.received)
    answers = await asyncio.gather(
        *(ask(server, completion_request("script:slow")) for _ in range(100))
    )
    statuses = [status for status, _, _ in answers]
    assert (statuses.count(200), statuses.count(402)) == (10, 90)
    assert len(fake.received) - before == 10
    refused = next(answer for answer in answers if answer[0] == 402)
    seconds_to_midnight = (datetime.fromisoformat(tomorrow()) - datetime.now(UTC)).total_seconds()
    assert abs(int(refused[1]) - seconds_to_midnight) < 5
    assert orjson.loads(refused[2]) == exhausted("The server's daily budget")
    # The ten cost 0.0042 together: the room freed holds nine more reservations, not ten
    # (once each has been settled, a moment after its client read the end).
    await wait_until(lambda: nothing_reserved(server), 10, "the ten settled")
    answers = await asyncio.gather(
        *(ask(server, completion_request("script:slow")) for _ in range(10))
    )
    assert sorted(status for status, _, _ in answers) == [200] * 9 + [402]


async def test_a_user_key_passes_while_the_servers_budget_is_used_up(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_SERVER_DAILY_USD="0.005")
    assert (await ask(server, completion_request()))[0] == 402
    status, _, _ = await ask(server, completion_request(), {"x-openrouter-key": "user-key"})
    assert status == 200
    assert fake.last().headers["Authorization"] == "Bearer user-key"


async def test_an_apps_daily_cap_stops_that_app_only(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_APP_DAILY_USD="nwb-assistant=0.03")
    answers = await asyncio.gather(
        *(ask(server, completion_request("script:slow")) for _ in range(6))
    )
    assert sorted(status for status, _, _ in answers) == [200] * 3 + [402] * 3
    refused = next(answer for answer in answers if answer[0] == 402)
    assert orjson.loads(refused[2]) == exhausted("The daily budget of app nwb-assistant")
    # Another app, and the same app paid by its own key's budget scope, are not this one.
    assert (await ask(server, completion_request(app="bids-assistant")))[0] == 200


async def test_the_usage_report_shows_each_budget_in_force(start_server, fake, admin):
    server = await start(
        start_server,
        fake,
        QP_BUDGET_SERVER_DAILY_USD="1",
        QP_BUDGET_SERVER_MONTHLY_USD="30",
        QP_BUDGET_APP_DAILY_USD="*=0.5,bids-assistant=2",
    )
    await ask(server, completion_request())  # nwb-assistant, server-paid, 0.00042
    held = asyncio.create_task(
        ask(server, completion_request("script:slow"))
    )  # 0.01 reserved for a second
    await asyncio.sleep(0.3)
    status, report = await call(server.client, "GET", "/api/usage", headers=admin)
    await held
    month_end = datetime.fromisoformat(tomorrow()).replace(day=1)
    if month_end <= datetime.now(UTC):
        month_end = (month_end + timedelta(days=32)).replace(day=1)

    def budget(scope: str, period: str, cap: float, resets: str, **app: str) -> dict:
        spent, reserved = 0.00042, 0.01
        if app.get("app") == "bids-assistant":
            spent = reserved = 0.0
        return {
            "scope": scope,
            **app,
            "period": period,
            "cap": cap,
            "spent": pytest.approx(spent),
            "reserved": pytest.approx(reserved),
            "remaining": pytest.approx(cap - spent - reserved),
            "resetsAt": resets,
        }

    month = month_end.strftime("%Y-%m-%dT00:00:00.000Z")
    assert status == 200
    assert report["budgets"] == [
        budget("server", "day", 1.0, tomorrow()),
        budget("server", "month", 30.0, month),
        budget("app", "day", 2.0, tomorrow(), app="bids-assistant"),
        budget("app", "day", 0.5, tomorrow(), app="nwb-assistant"),
    ]
    (row,) = report["totals"]
    assert row["costSource"] == {"stream": 1, "generation": 0, "estimate": 0}
    async with server.client.get("/metrics") as response:
        metrics = await response.text()
    spend = 'qp_spend_usd_total{app="nwb-assistant",model="openai/gpt-4.1-mini",payer="server"}'
    assert f"{spend} 0.00084" in metrics
    remaining = {
        line.split("}")[0] + "}": float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("qp_budget_remaining_usd{")
    }
    assert remaining == {
        'qp_budget_remaining_usd{scope="server_daily"}': pytest.approx(1 - 0.00084),
        'qp_budget_remaining_usd{scope="server_monthly"}': pytest.approx(30 - 0.00084),
        'qp_budget_remaining_usd{scope="app:bids-assistant"}': 2.0,
        'qp_budget_remaining_usd{scope="app:nwb-assistant"}': pytest.approx(0.5 - 0.00084),
    }


async def test_the_star_cap_applies_to_every_app_not_named(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_APP_DAILY_USD="*=0.005,bids-assistant=1")
    assert (await ask(server, completion_request(app="some-app")))[0] == 402
    assert (await ask(server, completion_request(app="bids-assistant")))[0] == 200


async def test_a_clients_allowance_stops_that_client_only(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_CLIENT_DAILY_USD="0.02")
    first = {"X-Forwarded-For": "203.0.113.1"}  # the in-process peer is a trusted proxy
    answers = await asyncio.gather(
        *(ask(server, completion_request("script:slow"), first) for _ in range(3))
    )
    assert sorted(status for status, _, _ in answers) == [200, 200, 402]
    refused = next(answer for answer in answers if answer[0] == 402)
    assert orjson.loads(refused[2]) == exhausted("Your daily allowance")
    async with server.client.get("/metrics") as response:
        assert 'qp_budget_refusals_total{scope="client_daily"} 1.0' in await response.text()
    other = {"X-Forwarded-For": "203.0.113.2"}
    assert (await ask(server, completion_request(), other))[0] == 200


async def test_a_client_may_hold_only_so_many_streams_open(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_CLIENT_MAX_STREAMS="2")
    answers = await asyncio.gather(
        *(ask(server, completion_request("script:slow")) for _ in range(3))
    )
    assert sorted(status for status, _, _ in answers) == [200, 200, 429]
    async with server.client.get("/metrics") as response:
        assert 'qp_budget_refusals_total{scope="client_max_streams"} 1.0' in await response.text()
    # Once they are done, the client may open streams again.
    assert (await ask(server, completion_request()))[0] == 200


async def test_too_many_open_streams_is_the_contracts_429(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_CLIENT_MAX_STREAMS="1")
    held = asyncio.create_task(ask(server, completion_request("script:slow")))
    await asyncio.sleep(0.3)
    assert await call(
        server.client, "POST", "/api/completion", json=completion_request("script:slow")
    ) == (
        429,
        {"error": "Too many open completions"},
    )
    assert (await held)[0] == 200


async def test_a_sighup_that_lowers_a_cap_applies_to_the_next_request(qp_server, fake, tmp_path):
    config = tmp_path / "qp.toml"
    config.write_text("[budgets]\nserver_daily_usd = 1.0\n")
    server = qp_server(QP_CONFIG=str(config), QP_OPENROUTER_URL=fake.url, **KEYS, **RESERVE)
    async with aiohttp.ClientSession(server.url) as http:
        request = completion_request()
        async with http.post("/api/completion", json=request) as response:
            assert response.status == 200
            await response.read()
        config.write_text("[budgets]\nserver_daily_usd = 0.005\n")
        server.signal(signal.SIGHUP)
        await wait_for_log(server, "policy reloaded")
        status, body = await call(http, "POST", "/api/completion", json=request)
    assert (status, body["error"]) == (402, "Budget exhausted")


async def test_what_was_spent_today_survives_a_restart(start_server, fake):
    server = await start(start_server, fake, QP_BUDGET_SERVER_DAILY_USD="0.0102")
    assert (await ask(server, completion_request()))[0] == 200  # spent 0.00042
    await server.stop()
    again = await start(
        start_server, fake, QP_BUDGET_SERVER_DAILY_USD="0.0102", QP_DATA_DIR=str(server.data_dir)
    )
    # 0.00042 spent + 0.01 reserved passes 0.0102 only if the spend was remembered.
    assert (await ask(again, completion_request()))[0] == 402


async def test_every_stream_is_costed_in_the_ledger(start_server, fake):
    server = await start(start_server, fake)
    fake.scripts["cut"] = Script(
        chunks=[(0.0, b'data: {"id":"gen-cut-1","choices":[]}\n\n')], die=True
    )
    fake.scripts["401c"] = Script(status=401, body=b"{}")
    for content in ("hi", "script:cut", "script:401c"):
        await ask(server, completion_request(content))
    await server.stop()
    columns = ("outcome", "cost", "cost_source", "generation_id", "client_hash")
    rows = [tuple(row[name] for name in columns) for row in ledger(server)]
    assert [row[:4] for row in rows] == [
        ("completed", 0.00042, "stream", "gen-1"),
        ("upstream_died", 0.01, "estimate", "gen-cut-1"),
        ("upstream_error", None, None, None),
    ]
    assert all(len(row[4]) == 64 for row in rows)  # the salted hash, never the address


# --- the book on its own clock ----------------------------------------------------------


class Clock:
    def __init__(self, moment: datetime):
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


async def test_the_server_rolls_its_day_over_at_utc_midnight_and_its_month_on_the_first(
    start_server, fake, admin
):
    """On the server's own clock: a day's spend stops at its cap until midnight, and a
    month's across its days until the first of the next."""
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":9,"cost":0.4}}\n\n'
    fake.scripts["costly"] = Script(chunks=[(0.0, usage), (0.0, b"data: [DONE]\n\n")])
    clock = Clock(datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC))
    server = await start(
        start_server,
        fake,
        clock=clock,
        QP_BUDGET_SERVER_DAILY_USD="1.0",
        QP_BUDGET_SERVER_MONTHLY_USD="1.5",
        QP_BUDGET_DEFAULT_RESERVE_USD="0.4",
    )
    costly = completion_request("script:costly")

    async def spend_on(*days: datetime) -> None:
        for day in days:
            clock.now = day.timestamp()
            assert (await ask(server, costly))[0] == 200

    def refused(budget: str, resets: str, retry_after: int) -> tuple:
        body = {
            "error": "Budget exhausted",
            "message": f"{budget} is used up; it resets at {resets}",
        }
        return 402, str(retry_after), orjson.dumps(body)

    await spend_on(datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC))
    await spend_on(datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC))
    # 0.8 spent today: a third 0.4 would pass the day's 1.0.
    assert await ask(server, costly) == refused(
        "The server's daily budget", "2026-02-01T00:00:00.000Z", 60
    )
    # February 1st: a new day and a new month.
    await spend_on(datetime(2026, 2, 1, 0, 0, 30, tzinfo=UTC), datetime(2026, 2, 1, 12, tzinfo=UTC))
    await spend_on(datetime(2026, 2, 2, 9, tzinfo=UTC))  # the month has 1.2 of its 1.5
    clock.now = datetime(2026, 2, 3, 9, tzinfo=UTC).timestamp()  # a new day, the same month
    assert await ask(server, costly) == refused(
        "The server's monthly budget", "2026-03-01T00:00:00.000Z", 25 * 86400 + 15 * 3600
    )
    _, report = await call(server.client, "GET", "/api/usage", headers=admin)
    assert [(b["period"], b["spent"], b["resetsAt"]) for b in report["budgets"]] == [
        ("day", 0.0, "2026-02-04T00:00:00.000Z"),
        ("month", pytest.approx(1.2), "2026-03-01T00:00:00.000Z"),
    ]
    await spend_on(datetime(2026, 3, 1, 0, 0, 5, tzinfo=UTC))  # March


@pytest.fixture
async def open_book(database_name, request):
    """A budget book on a clock: in memory (SQLite's), or shared in a PostgreSQL database."""
    opened = []

    async def open_book(clock) -> BudgetBook:
        if database_name == "sqlite":
            return BudgetBook(MemoryAccounts(), clock)
        url = request.getfixturevalue("postgres").create_database()
        db = await PostgresDatabase.open(url)
        opened.append(db)
        return shared_budget_book(db, "test-process", clock)

    yield open_book
    for db in opened:
        await db.close()


async def test_a_day_rolls_over_at_utc_midnight_and_a_month_on_the_first(open_book):
    clock = Clock(datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC))
    book = await open_book(clock)
    day, month = Scope("server", "", DAY), Scope("server", "", MONTH)
    held = await book.reserve([(day, 1.0), (month, 1.5)], 0.6)
    assert isinstance(held, Reservation)
    await book.settle(held, 0.5)
    refusal = await book.reserve([(day, 1.0), (month, 1.5)], 0.6)
    assert refusal == Refusal(day, datetime(2026, 2, 1, tzinfo=UTC).timestamp(), 60)
    assert refusal.message == (
        "The server's daily budget is used up; it resets at 2026-02-01T00:00:00.000Z"
    )
    clock.now += 60  # February: a new day and a new month
    await book.refresh()
    assert book.standing(day) == (0.0, 0.0) and book.standing(month) == (0.0, 0.0)
    assert isinstance(await book.reserve([(day, 1.0), (month, 1.5)], 0.6), Reservation)


async def test_a_month_keeps_its_spend_across_days(open_book):
    clock = Clock(datetime(2026, 12, 30, 12, tzinfo=UTC))
    book = await open_book(clock)
    day, month = Scope("server", "", DAY), Scope("server", "", MONTH)
    await book.settle(await book.reserve([(day, 1.0), (month, 1.0)], 0.1), 0.7)
    clock.now += 86400  # the 31st
    refusal = await book.reserve([(day, 1.0), (month, 1.0)], 0.4)
    assert isinstance(refusal, Refusal) and refusal.scope == month
    assert refusal.message.endswith("it resets at 2027-01-01T00:00:00.000Z")
    assert refusal.message.startswith("The server's monthly budget is used up")


async def test_a_reservation_settled_after_its_period_ended_leaves_the_new_period_alone(open_book):
    clock = Clock(datetime(2026, 5, 1, 23, 59, 59, tzinfo=UTC))
    book = await open_book(clock)
    day = Scope("app", "nwb", DAY)
    held = await book.reserve([(day, 1.0)], 0.3)
    clock.now += 2
    await book.settle(held, 0.9)
    await book.refresh()
    assert book.standing(day) == (0.0, 0.0)


async def test_a_refused_reservation_reserves_nothing_anywhere(open_book):
    book = await open_book(Clock(datetime(2026, 5, 1, tzinfo=UTC)))
    roomy, tight = Scope("server", "", DAY), Scope("client", "c", DAY)
    assert isinstance(await book.reserve([(roomy, 10.0), (tight, 0.1)], 0.2), Refusal)
    await book.refresh()
    assert book.standing(roomy) == (0.0, 0.0)


async def test_a_shared_book_forgets_the_accounts_of_ended_periods(postgres):
    db = await PostgresDatabase.open(postgres.create_database())
    try:
        clock = Clock(datetime(2026, 5, 1, 12, tzinfo=UTC))
        book = shared_budget_book(db, "test-process", clock)
        client = Scope("client", "c", DAY)
        await book.settle(await book.reserve([(client, 1.0)], 0.1), 0.1)
        clock.now += 86400  # the next day: yesterday's account is still kept
        await book.settle(await book.reserve([(client, 1.0)], 0.1), 0.1)
        await book.accounts.forget_ended()
        assert await db.fetchall("SELECT COUNT(*) FROM budget_accounts") == [(2,)]
        clock.now += 2 * 86400
        await book.accounts.forget_ended()
        assert await db.fetchall("SELECT COUNT(*) FROM budget_accounts") == [(0,)]
    finally:
        await db.close()


async def test_the_budgets_command_prints_each_budget_from_the_ledger(start_server, fake):
    server = await start(start_server, fake)
    await ask(server, completion_request())  # nwb-assistant, server-paid, 0.00042
    await server.stop()
    caps = {"QP_BUDGET_SERVER_DAILY_USD": "1", "QP_BUDGET_APP_DAILY_USD": "nwb-assistant=0.5"}
    done = await asyncio.to_thread(
        run_qp, server.data_dir, "budgets", **caps, **server.database.env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "SCOPE   APP            PERIOD  CAP USD  SPENT USD  REMAINING USD  RESETS AT",
        f"server                 day     1.0000   0.0004     0.9996         {tomorrow()}",
        f"app     nwb-assistant  day     0.5000   0.0004     0.4996         {tomorrow()}",
    ]
    done = await asyncio.to_thread(run_qp, server.data_dir, "budgets")
    assert (done.returncode, done.stdout) == (
        0,
        "no budgets configured (see [budgets] in qp.example.toml)\n",
    )


# --- prices ------------------------------------------------------------------------------


async def prices_fetched(server: AppServer) -> None:
    """The model list is fetched at start-up, in the background: wait for it."""
    for _ in range(200):
        if server.app[PRICES].fetched:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the model list was not fetched within 10 s")


async def reserved_while_held(server: AppServer, admin: dict) -> float:
    """What one held completion of CHEAP (nwb-assistant) reserves in the server's budget."""
    held = asyncio.create_task(ask(server, completion_request("script:slow")))
    await asyncio.sleep(0.3)
    _, report = await call(server.client, "GET", "/api/usage", headers=admin)
    await held
    return report["budgets"][0]["reserved"]


async def test_reservations_use_the_model_lists_prices_kept_across_a_restart(
    start_server, fake, admin
):
    # Prompt free, answers 0.002 a token: 10 reserved tokens reserve exactly 0.02.
    fake.models = [(CHEAP, "0", "0.002"), ("vendor/odd", "-1", "x")]
    fake.models_status = 200
    caps = {"QP_BUDGET_SERVER_DAILY_USD": "5", "QP_BUDGET_RESERVE_COMPLETION_TOKENS": "10"}
    server = await start(start_server, fake, **caps)
    await prices_fetched(server)
    assert await reserved_while_held(server, admin) == pytest.approx(0.02)
    await server.stop()
    fake.models_status = 503  # the next start cannot fetch it: the kept prices serve
    again = await start(start_server, fake, QP_DATA_DIR=str(server.data_dir), **caps)
    assert await reserved_while_held(again, admin) == pytest.approx(0.02)


async def test_the_policys_prices_win_over_the_model_list(start_server, fake, admin, tmp_path):
    fake.models = [(CHEAP, "0", "0.002")]
    fake.models_status = 200
    config = tmp_path / "qp.toml"
    config.write_text(
        "[budgets]\nserver_daily_usd = 5.0\nreserve_completion_tokens = 10\n\n"
        f'[prices]\n"{CHEAP}" = {{ prompt = 0.0, completion = 0.003 }}\n'
    )
    server = await start(start_server, fake, QP_CONFIG=str(config))
    await prices_fetched(server)
    assert await reserved_while_held(server, admin) == pytest.approx(0.03)


def test_only_well_formed_prices_are_taken_from_the_model_list():
    listing = {
        "data": [
            {"id": "a", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
            {"id": "router", "pricing": {"prompt": "-1", "completion": "-1"}},
            {"id": "no-pricing"},
            "not a model",
            {"id": "nan", "pricing": {"prompt": "nan", "completion": "0.000001"}},
            {"id": 7, "pricing": {"prompt": "0", "completion": "0"}},
        ]
    }
    assert parse_model_list(listing) == {"a": (1e-6, 2e-6)}
    assert parse_model_list({"data": "nothing"}) == {} == parse_model_list([1, 2])


# --- alerts ------------------------------------------------------------------------------

ALERTING = {"QP_BUDGET_SERVER_DAILY_USD": "0.001", "QP_BUDGET_DEFAULT_RESERVE_USD": "0.0001"}


async def test_alerts_reach_the_webhook_once_per_threshold(start_server, fake, aiohttp_server):
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(receiver_app)
    server = await start_server(
        QP_OPENROUTER_URL=fake.url,
        QP_ALERT_WEBHOOK_URL=str(receiver.make_url("/hook")),
        **KEYS,
        **ALERTING,
    )
    # Each costs 0.00042 of the 0.001 cap: 42 %, 84 % (past 50 and 80), 126 % (past 100).
    statuses = [(await ask(server, completion_request()))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 402]
    for _ in range(100):
        if len(received) >= 3:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and nothing more comes
    assert [(a["scope"], a["period"], a["cap"], a["percent"]) for a in received] == [
        ("server_daily", "day", 0.001, 50),
        ("server_daily", "day", 0.001, 80),
        ("server_daily", "day", 0.001, 100),
    ]
    assert received[1]["spent"] == pytest.approx(0.00084)
    assert received[0]["text"].startswith(
        "qp-server: The server's daily budget has passed 50 % of its cap:"
        " $0.0008 of $0.0010 spent in the day from "
    )


async def test_a_webhook_that_is_down_delays_no_completion(start_server, fake):
    server = await start_server(
        QP_OPENROUTER_URL=fake.url,
        QP_ALERT_WEBHOOK_URL="http://127.0.0.1:9/hook",
        **KEYS,
        **ALERTING,
    )
    started = asyncio.get_running_loop().time()
    statuses = [(await ask(server, completion_request()))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_a_model_list_of_many_packets_is_read_whole(start_server, fake):
    # OpenRouter's list is about a megabyte: it arrives in many pieces, all of which count.
    fake.models = [(f"vendor/model-{n:05d}", "0.000001", "0.000002") for n in range(20_000)]
    server = await start(start_server, fake)
    await prices_fetched(server)
    fetched = server.app[PRICES].fetched
    assert len(fetched) == 20_000
    assert fetched["vendor/model-19999"] == (1e-6, 2e-6)


async def test_without_a_key_of_its_own_the_server_fetches_no_prices(start_server, fake):
    fake.models = [(CHEAP, "0", "0.002")]
    before = fake.model_list_requests
    server = await start_server(QP_OPENROUTER_URL=fake.url)
    assert await call(server.client, "GET", "/api/chats/none") == (
        404,
        {"error": "Chat not found"},
    )
    await asyncio.sleep(0.5)
    assert fake.model_list_requests == before
    assert server.app[PRICES].fetched == {}
