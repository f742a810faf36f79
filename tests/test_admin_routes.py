"""The operator's page as the server serves it: GET /admin and its files (CSP, caching), and
the admin JSON routes it reads (/api/admin/overview, spend, apps, blocks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.app_server import AppServer, StartServer
from tests.helpers import (
    ADMIN_KEY,
    ISO_MS,
    a_fresh_hour,
    a_fresh_minute,
    block_by_refusals,
    call,
    completion_request,
    create,
    make_chat,
    served_once_then_limited_not_blocked,
)

pytestmark = pytest.mark.on_both_databases

ADMIN_ROUTES = [
    ("GET", "/api/admin/overview"),
    ("GET", "/api/admin/spend"),
    ("GET", "/api/admin/apps"),
    ("GET", "/api/admin/blocks"),
    ("DELETE", "/api/admin/blocks/" + "a" * 64),
]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " frame-ancestors 'none'"
)


class Clock:
    def __init__(self, moment: datetime):
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


# --- the page ---------------------------------------------------------------------------


async def test_the_page_is_also_at_admin_with_a_slash(http):
    async with http.get("/admin/", allow_redirects=False) as response:
        assert response.status == 200
        assert response.content_type == "text/html"


async def test_the_page_is_served_with_its_csp_and_revalidated_by_etag(http):
    async with http.get("/admin") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
        headers = response.headers
    assert headers["Content-Security-Policy"] == CSP
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert '<script src="/admin/static/admin.js" defer></script>' in page
    assert "<script>" not in page and " style=" not in page  # nothing inline
    async with http.get("/admin", headers={"If-None-Match": headers["ETag"]}) as again:
        assert again.status == 304
        assert await again.read() == b""


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("admin.js", "text/javascript"), ("charts.js", "text/javascript"), ("admin.css", "text/css")],
)
async def test_the_pages_files_are_served_with_its_headers(http, name, content_type):
    async with http.get(f"/admin/static/{name}") as response:
        assert response.status == 200
        assert response.content_type == content_type
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["ETag"].startswith('"')


@pytest.mark.parametrize(
    "path", ["/admin/static/nothing.js", "/admin/static/index.html", "/admin/static/..%2Fpage.py"]
)
async def test_anything_else_under_admin_is_404(http, path):
    assert await call(http, "GET", path) == (404, {"error": "Not found"})


# --- the key ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"x-admin-key": "wrong"}])
async def test_every_admin_route_needs_the_key(http, method, path, headers):
    assert await call(http, method, path, headers=headers) == (401, {"error": "Unauthorized"})


async def test_the_key_answers_whatever_the_origin(http, admin):
    evil = {"Origin": "https://evil.example"}
    assert (await call(http, "GET", "/api/admin/apps", headers=evil))[0] == 401
    async with http.get("/api/admin/apps", headers={**evil, **admin}) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


# --- overview ---------------------------------------------------------------------------


@pytest.mark.on_both_backends
async def test_the_overview_shows_health_version_and_masked_settings(
    start_server, backend_name, database_name, admin
):
    server = await start_server(OPENROUTER_API_KEY="sk-or-secret-value")
    status, overview = await call(server.client, "GET", "/api/admin/overview", headers=admin)
    assert status == 200
    settings = overview.pop("settings")
    started = overview.pop("startedAt")
    assert ISO_MS.fullmatch(started)
    assert 0 <= overview.pop("uptimeSeconds") < 60
    assert overview == {
        "status": "ok",
        "checks": {"database": "ok", "storage": "ok"},
        "version": "0.1.0",
        "openStreams": 0,
        "openBreakers": {},
        "database": {"sqlite": "sqlite", "postgres": "postgresql"}[database_name],
        "storage": backend_name,
    }
    assert "admin_key = ******** (set)" in settings
    assert ADMIN_KEY not in settings and "sk-or-secret-value" not in settings


# --- spend ------------------------------------------------------------------------------

# (started_at, app, model, payer, outcome, cost, cost_source): around the day boundaries
# before the clock's now, 2026-11-26T01:15Z, one in the month before, and one a user paid.
LEDGER = [
    ("2026-10-31T23:00:00.000Z", "a", "m1", "server", "completed", 1.0, "stream"),
    ("2026-11-24T23:59:59.999Z", "a", "m1", "server", "completed", 0.1, "stream"),
    ("2026-11-25T00:00:00.000Z", "a", "m2", "app", "client_left", 0.25, "generation"),
    ("2026-11-25T10:00:00.000Z", "a", "m1", "user", "completed", 5.0, "stream"),
    ("2026-11-25T13:00:00.000Z", "b", "m1", "server", "upstream_died", 0.3, "estimate"),
    ("2026-11-26T00:30:00.000Z", None, "m1", "server", "timeout", 0.4, "estimate"),
    ("2026-11-26T01:00:00.000Z", "b", "m2", "server", "upstream_error", None, None),
]
NOW = datetime(2026, 11, 26, 1, 15, tzinfo=UTC)


async def ledger_server(start_server: StartServer) -> AppServer:
    server = await start_server(clock=Clock(NOW))
    server.database.execute_many(
        "INSERT INTO completions (started_at, app, model, payer, outcome, cost, cost_source,"
        " status, duration_ms, client_left) VALUES (?, ?, ?, ?, ?, ?, ?, 200, 5, 0)",
        LEDGER,
    )
    return server


def days(first: int, last: int, costs: dict[int, dict[str, float]]) -> list[dict]:
    """The series for November `first` to `last` (October's 31st as day 0 and before)."""
    series = []
    for n in range(first, last + 1):
        day = f"2026-11-{n:02d}" if n > 0 else f"2026-10-{31 + n:02d}"
        found = costs.get(n, {})
        series.append({"day": day, "costs": found, "total": pytest.approx(sum(found.values()))})
    return series


async def test_spend_is_what_the_servers_and_apps_keys_paid_per_utc_day_by_app(start_server, admin):
    server = await ledger_server(start_server)
    status, spend = await call(server.client, "GET", "/api/admin/spend?days=7", headers=admin)
    assert status == 200
    assert {k: spend[k] for k in ("days", "by", "payer", "from", "to", "names")} == {
        "days": 7,
        "by": "app",
        "payer": "operator",
        "from": "2026-11-20",
        "to": "2026-11-26",
        "names": ["", "a", "b"],  # by their cost in the range: 0.4, 0.35, 0.3
    }
    assert spend["series"] == days(
        20, 26, {24: {"a": 0.1}, 25: {"a": 0.25, "b": 0.3}, 26: {"": 0.4}}
    )
    assert spend["total"] == pytest.approx(1.05)
    assert spend["today"] == pytest.approx(0.4)
    assert spend["month"] == pytest.approx(1.05)
    assert spend["costSource"] == {
        "stream": {"completions": 1, "cost": pytest.approx(0.1)},
        "generation": {"completions": 1, "cost": pytest.approx(0.25)},
        "estimate": {"completions": 2, "cost": pytest.approx(0.7)},
    }
    assert spend["budgets"] == []


async def test_spend_by_model_over_30_days_reaches_into_the_month_before(start_server, admin):
    server = await ledger_server(start_server)
    status, spend = await call(
        server.client, "GET", "/api/admin/spend?days=30&by=model", headers=admin
    )
    assert status == 200
    assert (spend["from"], spend["to"], spend["names"]) == (
        "2026-10-28",
        "2026-11-26",
        ["m1", "m2"],
    )
    assert spend["series"] == days(
        -3, 26, {0: {"m1": 1.0}, 24: {"m1": 0.1}, 25: {"m2": 0.25, "m1": 0.3}, 26: {"m1": 0.4}}
    )
    assert spend["total"] == pytest.approx(2.05)
    assert spend["month"] == pytest.approx(1.05)  # November only


async def test_spend_for_every_payer_counts_the_users_own_keys_too(start_server, admin):
    server = await ledger_server(start_server)
    _, spend = await call(server.client, "GET", "/api/admin/spend?days=7&payer=all", headers=admin)
    assert spend["payer"] == "all"
    assert spend["series"][5] == {
        "day": "2026-11-25",
        "costs": {"a": pytest.approx(5.25), "b": pytest.approx(0.3)},
        "total": pytest.approx(5.55),
    }
    assert (spend["total"], spend["month"], spend["today"]) == (
        pytest.approx(6.05),
        pytest.approx(6.05),
        pytest.approx(0.4),
    )
    assert spend["costSource"]["stream"] == {"completions": 2, "cost": pytest.approx(5.1)}
    assert sum(hour["completed"] for hour in spend["hourly"]) == 2


async def test_spend_counts_completions_per_hour_for_48_hours_by_outcome(start_server, admin):
    server = await ledger_server(start_server)
    _, spend = await call(server.client, "GET", "/api/admin/spend", headers=admin)
    hourly = spend["hourly"]
    assert len(hourly) == 48
    assert (hourly[0]["hour"], hourly[-1]["hour"]) == (
        "2026-11-24T02:00:00.000Z",
        "2026-11-26T01:00:00.000Z",
    )
    busy = {hour.pop("hour"): hour for hour in hourly if any(hour[k] for k in hour if k != "hour")}
    none = {"completed": 0, "clientLeft": 0, "upstreamError": 0, "timeout": 0, "other": 0}
    assert busy == {
        "2026-11-24T23:00:00.000Z": {**none, "completed": 1},
        "2026-11-25T00:00:00.000Z": {**none, "clientLeft": 1},
        "2026-11-25T13:00:00.000Z": {**none, "upstreamError": 1},
        "2026-11-26T00:00:00.000Z": {**none, "timeout": 1},
        "2026-11-26T01:00:00.000Z": {**none, "upstreamError": 1},
    }


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("days=0", "Invalid days parameter"),
        ("days=367", "Invalid days parameter"),
        ("days=-1", "Invalid days parameter"),
        ("days=7.5", "Invalid days parameter"),
        ("days=99999999999999999999999", "Invalid days parameter"),
        ("days=%C2%B2", "Invalid days parameter"),  # a superscript 2: a digit to str.isdigit
        ("by=payer", "Invalid by parameter"),
        ("payer=user", "Invalid payer parameter"),
    ],
)
async def test_spend_refuses_a_bad_range_or_grouping(http, admin, query, error):
    assert await call(http, "GET", f"/api/admin/spend?{query}", headers=admin) == (
        400,
        {"error": error},
    )


async def test_spend_sums_real_completions_like_the_usage_report(start_server, fake, admin):
    server = await start_server(
        QP_OPENROUTER_URL=fake.url,
        OPENROUTER_API_KEY="server-key",
        QP_BUDGET_SERVER_DAILY_USD="1",
    )
    request = completion_request()
    for _ in range(3):
        async with server.client.post("/api/completion", json=request) as response:
            assert response.status == 200
            await response.read()
    _, usage = await call(server.client, "GET", "/api/usage", headers=admin)
    _, spend = await call(server.client, "GET", "/api/admin/spend", headers=admin)
    assert spend["total"] == pytest.approx(usage["overall"]["cost"]) == pytest.approx(0.00126)
    assert spend["series"][-1]["costs"] == {"nwb-assistant": pytest.approx(0.00126)}
    assert spend["budgets"] == usage["budgets"]
    assert sum(hour["completed"] for hour in spend["hourly"]) == 3


# --- apps -------------------------------------------------------------------------------


async def test_apps_are_listed_with_their_chat_counts(http, admin, app_name):
    other = f"{app_name}-b"
    for app in (app_name, app_name, other):
        await create(http, make_chat(app=app))
    _, newest = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    status, body = await call(http, "GET", "/api/admin/apps", headers=admin)
    assert status == 200
    ours = [app for app in body["apps"] if app["app"].startswith(app_name)]
    assert ours == [
        {"app": app_name, "chats": 2, "updatedAt": newest[0]["updatedAt"]},
        {"app": other, "chats": 1, "updatedAt": ours[1]["updatedAt"]},
    ]


async def test_apps_are_the_ones_with_the_most_chats_when_there_are_too_many(
    start_server, admin, monkeypatch
):
    monkeypatch.setattr("qp.admin.handlers.MAX_APPS", 2)
    server = await start_server()
    for app, chats in (("few", 1), ("many", 3), ("some", 2)):
        for _ in range(chats):
            await create(server.client, make_chat(app=app))
    _, body = await call(server.client, "GET", "/api/admin/apps", headers=admin)
    assert [(app["app"], app["chats"]) for app in body["apps"]] == [("many", 3), ("some", 2)]


# --- blocks -----------------------------------------------------------------------------


async def test_a_block_is_listed_and_lifted_and_the_client_served_again(start_server, admin):
    server = await start_server(QP_RATE_LIMIT_CHATS="1/minute")
    await a_fresh_minute()
    client = {"X-Forwarded-For": "203.0.113.50"}  # the in-process peer is a trusted proxy
    assert (await call(server.client, "GET", "/api/chats/nothing", headers=client))[0] == 404
    for _ in range(10):  # ten refusals within the hour block the client
        assert (await call(server.client, "GET", "/api/chats/nothing", headers=client))[0] == 429
    status, body = await call(server.client, "GET", "/api/chats/nothing", headers=client)
    assert (status, body["message"]) == (429, "IP blocked due to excessive violations")

    status, found = await call(server.client, "GET", "/api/admin/blocks", headers=admin)
    assert status == 200
    (block,) = found["blocks"]
    assert len(block["client"]) == 64 and ISO_MS.fullmatch(block["since"])
    blocked_for = datetime.fromisoformat(block["until"]) - datetime.fromisoformat(block["since"])
    assert abs(blocked_for - timedelta(hours=24)) < timedelta(seconds=1)
    assert len(found["refusals"]) == 48
    assert found["refusals"][-1]["refusals"] == 11

    lift = f"/api/admin/blocks/{block['client']}"
    assert await call(server.client, "DELETE", lift, headers=admin) == (200, {"success": True})
    # Served at once, with fresh counts (its minute was used up before the block).
    assert (await call(server.client, "GET", "/api/chats/nothing", headers=client))[0] == 404
    assert (await call(server.client, "GET", "/api/admin/blocks", headers=admin))[1]["blocks"] == []
    assert await call(server.client, "DELETE", lift, headers=admin) == (
        404,
        {"error": "Block not found"},
    )


async def test_a_lifted_client_starts_afresh_and_its_next_refusal_does_not_block_it(
    start_server, admin
):
    server = await start_server(QP_RATE_LIMIT_CHATS="1/hour")
    client = {"X-Forwarded-For": "203.0.113.51"}
    await a_fresh_hour()
    await block_by_refusals(server.client, client)
    _, found = await call(server.client, "GET", "/api/admin/blocks", headers=admin)
    lift = f"/api/admin/blocks/{found['blocks'][0]['client']}"
    assert await call(server.client, "DELETE", lift, headers=admin) == (200, {"success": True})
    await served_once_then_limited_not_blocked(server.client, client)
    assert (await call(server.client, "GET", "/api/admin/blocks", headers=admin))[1]["blocks"] == []


def add_blocks(server: AppServer, count: int, until: str = "2999-01-01T00:00:00.000Z") -> None:
    """`count` blocks in the database behind the server's back, by hash 0 ... count - 1."""
    since = "2026-11-01T00:00:00.000Z"
    values = ", ".join(f"('{n:064x}', '{since}', '{until}')" for n in range(count))
    server.database.execute_many(f"INSERT INTO blocks VALUES {values}", [()])


async def test_the_blocks_come_a_page_of_100_at_a_time_by_client_hash(start_server, admin):
    server = await start_server()
    add_blocks(server, 250)
    # An ended block (the last hash of all) is in no page.
    server.database.execute_many(
        "INSERT INTO blocks VALUES (?, ?, ?)",
        [("f" * 64, "2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z")],
    )
    pages, after = [], ""
    for _ in range(3):
        status, page = await call(
            server.client, "GET", f"/api/admin/blocks?after={after}", headers=admin
        )
        assert status == 200
        pages.append([block["client"] for block in page["blocks"]])
        after = page["next"]
    assert [len(clients) for clients in pages] == [100, 100, 50]
    assert [client for clients in pages for client in clients] == [f"{n:064x}" for n in range(250)]
    assert after is None
    assert page["blocks"][0] == {
        "client": f"{200:064x}",
        "since": "2026-11-01T00:00:00.000Z",
        "until": "2999-01-01T00:00:00.000Z",
    }


@pytest.mark.parametrize("after", ["x", "A" * 64, "a" * 63, "a" * 65])
async def test_a_blocks_cursor_that_is_not_a_client_hash_is_400(http, admin, after):
    assert await call(http, "GET", f"/api/admin/blocks?after={after}", headers=admin) == (
        400,
        {"error": "Invalid after parameter"},
    )


@pytest.mark.parametrize("client", ["nothing", "A" * 64, "a" * 63, "g" * 64])
async def test_lifting_a_block_that_is_not_there_is_404(http, admin, client):
    assert await call(http, "DELETE", f"/api/admin/blocks/{client}", headers=admin) == (
        404,
        {"error": "Block not found"},
    )
