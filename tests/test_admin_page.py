"""The operator's page in a real browser: headless Debian Chromium, driven by Playwright,
against a server.py process whose ledger was filled by real completions on the fake
OpenRouter and whose chats were made through the API. Each view is photographed into
tests/artifacts/ (`make screenshots` runs this module alone)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from qp.timestamps import format_iso
from tests.fake_openrouter import Script
from tests.helpers import (
    ADMIN_KEY,
    a_fresh_hour,
    a_fresh_minute,
    block_by_refusals,
    call,
    completion_request,
    create,
    make_chat,
    served_once_then_limited_not_blocked,
)
from tests.processes import NEEDS_CHROMIUM, QPServer

ARTIFACTS = Path(__file__).parent / "artifacts"
XSS = "<img src=x onerror=alert(1)>"
BLOCKED = {"X-Forwarded-For": "198.51.100.9"}  # the server trusts its loopback peer

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def api(fake, tmp_path_factory) -> Iterator[QPServer]:
    server = QPServer(
        tmp_path_factory.mktemp("qp-admin-page"),
        {
            "ADMIN_KEY": ADMIN_KEY,
            "QP_OPENROUTER_URL": fake.url,
            "OPENROUTER_API_KEY": "server-key",
            "QP_BUDGET_SERVER_DAILY_USD": "0.01",
            "QP_BUDGET_APP_DAILY_USD": "*=0.004",
            "QP_BUDGET_DEFAULT_RESERVE_USD": "0.0001",
            "QP_RATE_LIMIT_CHATS": "20/minute",
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seeded(api) -> dict[str, str]:
    """Completions from a few clients, chats in two apps (one of them hostile), and a
    client blocked for hammering a chat route. Answers the chats' ids by name."""
    return asyncio.run(seed(api))


async def seed(api: QPServer) -> dict[str, str]:
    chats: dict[str, str] = {}
    async with aiohttp.ClientSession(api.url) as http:
        paid_by = ["server", "server", "server", "user"]
        await a_fresh_minute()
        for n, app in enumerate(
            ["nwb-assistant", "nwb-assistant", "bids-assistant", "nwb-assistant"]
        ):
            headers = {"X-Forwarded-For": f"203.0.113.{n + 1}"}
            if paid_by[n] == "user":
                headers["x-openrouter-key"] = "the-users-own-key"
            async with http.post(
                "/api/completion", json=completion_request(app=app), headers=headers
            ) as got:
                assert got.status == 200
                await got.read()
        chats["plain"] = await create(
            http,
            make_chat(
                app="nwb-assistant",
                messages=[
                    {"role": "user", "content": "How do I open an NWB file\nin Python?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"id": "t1", "function": {"name": "search"}}],
                    },
                    {"role": "assistant", "content": "Use pynwb's NWBHDF5IO."},
                ],
            ),
        )
        chats["xss"] = await create(
            http,
            make_chat(app="nwb-assistant", messages=[{"role": "user", "content": XSS}]),
        )
        chats["doomed"] = await create(
            http,
            make_chat(app="nwb-assistant", messages=[{"role": "user", "content": "delete me"}]),
        )
        chats["bids"] = await create(
            http, make_chat(app="bids-assistant", messages=[{"role": "user", "content": "BIDS?"}])
        )
        for _ in range(20 + 10):  # 20 allowed in the minute, then 10 refusals: blocked
            async with http.get("/api/chats/nothing", headers=BLOCKED):
                pass
        status, body = await call(http, "GET", "/api/chats/nothing", headers=BLOCKED)
        assert (status, body.get("message")) == (429, "IP blocked due to excessive violations")
    return chats


class Page:
    """One tab on the admin page, recording dialogs and page errors."""

    def __init__(self, page, api: QPServer):
        self.page = page
        self.api = api
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)

    async def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    async def sign_in(self, key: str = ADMIN_KEY) -> None:
        await self.page.goto(f"{self.api.url}/admin")
        await self.page.fill("#admin-key", key)
        await self.page.click("#sign-in-form button[type=submit]")

    async def show(self, view: str) -> None:
        await self.page.click(f"#tab-{view}")
        if view != "chats":
            await self.page.wait_for_selector(f"#view-{view}[data-loaded=true]", timeout=10_000)

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
async def admin_page(browser, api, seeded) -> AsyncIterator[Page]:
    page = Page(await browser.new_page(), api)
    try:
        yield page
    except BaseException:
        await page.screenshot("failed")
        raise
    assert page.dialogs == []


async def test_a_wrong_key_is_refused_and_the_right_one_shows_what_was_spent(admin_page, api):
    page = admin_page.page
    await admin_page.sign_in("not-the-key")
    await page.locator("#sign-in-error", has_text="Wrong admin key").wait_for()
    assert await page.is_hidden("#tabs") and await page.is_hidden("#view-spend")
    assert await page.evaluate("sessionStorage.length") == 0
    await admin_page.screenshot("admin-sign-in-refused")
    admin_page.errors.clear()  # the browser logs the 401 it was refused with

    await admin_page.sign_in()
    await page.wait_for_selector("#view-spend[data-loaded=true]", timeout=10_000)
    await admin_page.screenshot("admin-spend")
    async with aiohttp.ClientSession(api.url) as http:
        _, usage = await call(http, "GET", "/api/usage", headers={"x-admin-key": ADMIN_KEY})
    # What the server's and the apps' keys paid, then what everyone paid.
    operator = sum(row["cost"] for row in usage["totals"] if row["payer"] != "user")
    shown = float(await page.get_attribute("#spend-total", "data-usd"))
    assert shown == pytest.approx(operator) == pytest.approx(3 * 0.00042)
    assert "0.0013" in await page.text_content("#spend-total")
    # The chart has a bar for each app's day, and both apps in its legend.
    assert await page.locator("#chart-daily svg rect").count() == 2
    assert await page.locator("#legend-daily li").all_text_contents() == [
        "nwb-assistant",
        "bids-assistant",
    ]
    assert await page.locator("#chart-hourly svg rect").count() >= 1
    assert await page.locator("#budgets .budget").count() == 3  # server daily, two apps
    # The key is never in the address and never in a cookie.
    assert ADMIN_KEY not in page.url
    assert await page.context.cookies() == []
    assert admin_page.errors == []

    await page.select_option("#spend-payer", "all")
    await page.locator("#spend-total", has_text="0.0017").wait_for()
    shown = float(await page.get_attribute("#spend-total", "data-usd"))
    assert shown == pytest.approx(usage["overall"]["cost"]) == pytest.approx(4 * 0.00042)
    await page.select_option("#spend-by", "model")
    await page.locator("#legend-daily li", has_text="openai/gpt-4.1-mini").wait_for()
    assert await page.locator("#legend-daily li").count() == 1
    await page.click("#sign-out")
    assert await page.is_visible("#sign-in")
    assert await page.evaluate("sessionStorage.length") == 0


async def test_chats_are_browsed_read_and_deleted(admin_page, api, seeded):
    page = admin_page.page
    await admin_page.sign_in()
    await admin_page.show("chats")
    await page.click("#apps button:has-text('nwb-assistant')")
    rows = page.locator("#chat-table tbody tr")
    await rows.first.wait_for()
    assert await rows.count() == 3
    await page.click(f"tr[data-chat-id='{seeded['plain']}'] button")
    assert await page.text_content("#chat-title") == "How do I open an NWB file in Python?"
    messages = page.locator("#messages > li")
    assert await messages.count() == 3
    assert await page.locator("#messages details.tool-calls summary").text_content() == (
        "Tool calls (1)"
    )
    await admin_page.screenshot("admin-chats")

    await page.click(f"tr[data-chat-id='{seeded['doomed']}'] button")
    await page.click("#chat-delete")
    await page.click("#chat-delete-yes")
    await page.locator(f"tr[data-chat-id='{seeded['doomed']}']").wait_for(state="detached")
    assert await rows.count() == 2
    async with aiohttp.ClientSession(api.url) as http:
        assert (await call(http, "GET", f"/api/chats/{seeded['doomed']}"))[0] == 404
    assert admin_page.errors == []


async def test_a_hostile_chat_is_shown_as_text_and_runs_nothing(admin_page, seeded):
    page = admin_page.page
    await admin_page.sign_in()
    await admin_page.show("chats")
    await page.click("#apps button:has-text('nwb-assistant')")
    hostile = page.locator(f"tr[data-chat-id='{seeded['xss']}'] button")
    await hostile.wait_for()
    assert await hostile.text_content() == XSS
    await hostile.click()
    assert await page.text_content("#messages .text") == XSS
    assert await page.locator("#messages img, #chat-table img").count() == 0
    await page.wait_for_timeout(300)  # an onerror would have fired by now
    await admin_page.screenshot("admin-chat-hostile")
    assert admin_page.dialogs == []


async def test_a_blocked_client_is_lifted_and_served_again(admin_page, api, seeded):
    page = admin_page.page
    await admin_page.sign_in()
    await admin_page.show("clients")
    rows = page.locator("#blocks-table tbody tr")
    assert await rows.count() == 1
    assert await page.locator("#chart-refusals svg rect").count() >= 1
    await admin_page.screenshot("admin-clients")
    await rows.first.locator("button").click()
    await page.wait_for_selector("#no-blocks:not([hidden])")
    async with aiohttp.ClientSession(api.url) as http:
        status, _ = await call(http, "GET", "/api/chats/nothing", headers=BLOCKED)
    assert status == 404  # served again: a chat that is not there, not a 429
    assert admin_page.errors == []


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_client_lifted_on_the_page_is_not_blocked_again_by_its_next_refusal(
    browser, tmp_path, request, database
):
    env = {"ADMIN_KEY": ADMIN_KEY, "QP_RATE_LIMIT_CHATS": "1/hour"}
    if database == "postgres":
        env["QP_DATABASE"] = request.getfixturevalue("postgres").create_database()
    server = QPServer(tmp_path / "qp", env).start()
    try:
        await a_fresh_hour()
        async with aiohttp.ClientSession(server.url) as http:
            await block_by_refusals(http, BLOCKED)
            page = Page(await browser.new_page(), server)
            await page.sign_in()
            await page.show("clients")
            await page.page.locator("#blocks-table tbody tr button").click()
            await page.page.wait_for_selector("#no-blocks:not([hidden])")
            await served_once_then_limited_not_blocked(http, BLOCKED)
        assert page.errors == [] and page.dialogs == []
    finally:
        server.stop()


async def test_the_blocks_beyond_the_first_page_come_with_more_blocks(browser, tmp_path):
    server = QPServer(tmp_path / "qp", {"ADMIN_KEY": ADMIN_KEY}).start()
    try:
        since, until = "2026-11-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z"
        with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
            db.executemany(
                "INSERT INTO blocks VALUES (?, ?, ?)",
                [(f"{n:064x}", since, until) for n in range(101)],
            )
        page = Page(await browser.new_page(), server)
        await page.sign_in()
        await page.show("clients")
        rows = page.page.locator("#blocks-table tbody tr")
        assert await rows.count() == 100
        await page.page.click("#blocks-more")
        await page.page.wait_for_selector("#blocks-more[hidden]", state="attached")
        assert await rows.count() == 101
        assert await rows.last.get_attribute("data-client") == f"{100:064x}"
        assert page.errors == [] and page.dialogs == []
    finally:
        server.stop()


async def test_health_shows_the_checks_and_the_masked_settings(admin_page):
    page = admin_page.page
    await admin_page.sign_in()
    await admin_page.show("health")
    facts = await page.locator("#health-facts dd").all_text_contents()
    assert facts[:3] == ["ok", "ok", "ok"]  # status, database, storage
    settings = await page.text_content("#settings")
    assert "admin_key = ******** (set)" in settings and ADMIN_KEY not in settings
    await admin_page.screenshot("admin-health")


async def test_a_phone_gets_one_column_and_dark_mode_reads(admin_page):
    page = admin_page.page
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.emulate_media(color_scheme="dark")
    await admin_page.sign_in()
    await page.wait_for_selector("#view-spend[data-loaded=true]", timeout=10_000)
    await admin_page.screenshot("admin-spend-phone-dark")
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 23, 28)"
    # Keyboard: the tabs are reachable with Tab and open with Enter.
    await page.focus("#tab-spend")
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    await page.locator("#view-chats").wait_for()
    assert page.url.endswith("/admin#chats")


async def test_a_month_of_spend_draws_a_bar_for_each_app_and_day(browser, tmp_path):
    """A ledger of 30 days in three apps (written beside the running server): one bar
    segment per app and day that cost anything, and the range total is their sum."""
    server = QPServer(tmp_path / "qp", {"ADMIN_KEY": ADMIN_KEY}).start()
    try:
        today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        rows = []
        for n in range(30):
            day = today - timedelta(days=n)
            for k, (app, model) in enumerate(APPS_AND_MODELS):
                if (n + k) % 4 != 3:  # some days an app spent nothing
                    cost = round(0.05 + 0.01 * ((n * 7 + k * 3) % 11), 4)
                    rows.append((format_iso(day), app, model, cost))
        with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
            db.executemany(
                "INSERT INTO completions (started_at, app, model, payer, outcome, cost,"
                " cost_source, status, duration_ms, client_left)"
                " VALUES (?, ?, ?, 'server', 'completed', ?, 'stream', 200, 900, 0)",
                rows,
            )
        page = Page(await browser.new_page(), server)
        await page.sign_in()
        await page.page.wait_for_selector("#view-spend[data-loaded=true]", timeout=10_000)
        await page.screenshot("admin-spend-month")
        assert await page.page.locator("#chart-daily svg rect").count() == len(rows)
        shown = float(await page.page.get_attribute("#spend-total", "data-usd"))
        assert shown == pytest.approx(sum(row[3] for row in rows))
        assert page.errors == [] and page.dialogs == []
    finally:
        server.stop()


APPS_AND_MODELS = [
    ("nwb-assistant", "openai/gpt-4.1-mini"),
    ("bids-assistant", "google/gemini-2.5-flash"),
    ("dandi-assistant", "openai/gpt-5-mini"),
]


async def test_the_spend_view_shows_what_the_cache_saved_per_app(browser, tmp_path, fake):
    config = tmp_path / "qp.toml"
    config.write_text('[cache]\napp_ttl_seconds = { "widget-site" = 600 }\n')
    server = QPServer(
        tmp_path / "qp",
        {
            "ADMIN_KEY": ADMIN_KEY,
            "QP_CONFIG": str(config),
            "QP_OPENROUTER_URL": fake.url,
            "OPENROUTER_API_KEY": "server-key",
        },
    ).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            for _ in range(4):  # one paid, three replayed
                request = completion_request("ping", app="widget-site")
                async with http.post("/api/completion", json=request) as response:
                    assert response.status == 200
                    await response.read()
        page = Page(await browser.new_page(), server)
        await page.sign_in()
        await page.page.wait_for_selector("#view-spend[data-loaded=true]", timeout=10_000)
        await page.page.locator("#cache-apps tbody tr").first.wait_for()
        row = await page.page.locator("#cache-apps tbody tr").first.locator("th, td").all()
        assert [await cell.text_content() for cell in row] == ["widget-site", "3", "75%", "$0.0013"]
        assert "3 answers replayed" in await page.page.text_content("#cache-summary")
        await page.screenshot("admin-spend-cache")
        assert page.errors == [] and page.dialogs == []
    finally:
        server.stop()


async def test_the_health_view_names_an_open_breaker(browser, tmp_path, fake):
    server = QPServer(
        tmp_path / "qp",
        {
            "ADMIN_KEY": ADMIN_KEY,
            "QP_OPENROUTER_URL": fake.url,
            "OPENROUTER_API_KEY": "server-key",
            "QP_UPSTREAM_RETRIES": "0",
            "QP_BREAKER_FAILURES": "1",
        },
    ).start()
    fake.model_scripts["openai/gpt-5-nano"] = Script(status=503, body=b"{}")
    try:
        async with aiohttp.ClientSession(server.url) as http:
            request = completion_request("hi", model="openai/gpt-5-nano")
            assert (await call(http, "POST", "/api/completion", json=request))[0] == 503
        page = Page(await browser.new_page(), server)
        await page.sign_in()
        await page.show("health")
        facts = await page.page.locator("#health-facts dt").all_text_contents()
        assert "Breaker open: openai/gpt-5-nano" in facts
        assert page.errors == [] and page.dialogs == []
    finally:
        fake.model_scripts.clear()
        server.stop()


async def test_the_spend_view_shows_each_apps_policy_and_what_it_refused(browser, tmp_path, fake):
    config = tmp_path / "qp.toml"
    config.write_text(
        '[apps."bids-assistant"]\nmax_completion_tokens = 100\n'
        'system_prompt_prefixes = ["You are the BIDS assistant"]\n'
    )
    server = QPServer(
        tmp_path / "qp",
        {
            "ADMIN_KEY": ADMIN_KEY,
            "QP_CONFIG": str(config),
            "QP_OPENROUTER_URL": fake.url,
            "OPENROUTER_API_KEY": "server-key",
        },
    ).start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            rider = completion_request("essay please", app="bids-assistant")
            assert await call(http, "POST", "/api/completion", json=rider) == (
                400,
                {"error": "System message not allowed for app bids-assistant"},
            )
        page = Page(await browser.new_page(), server)
        await page.sign_in()
        await page.page.wait_for_selector("#view-spend[data-loaded=true]", timeout=10_000)
        cells = page.page.locator("#policies tbody tr").first.locator("th, td")
        assert await cells.all_text_contents() == [
            "bids-assistant",
            "the cheap list",
            "100",
            "\u2013",
            "\u201cYou are the BIDS assistant\u201d",
            "$0.00",
        ]
        refused = page.page.locator("#policy-refusals tbody tr").first.locator("th, td")
        assert await refused.all_text_contents() == [
            "bids-assistant",
            "a system prompt not its own",
            "1",
        ]
        await page.screenshot("admin-spend-policies")
        assert page.errors == [] and page.dialogs == []
    finally:
        server.stop()
