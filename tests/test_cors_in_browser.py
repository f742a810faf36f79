"""CORS in a real browser: headless Debian Chromium, driven by Playwright, streams a
completion cross-origin from the server, and is refused from an origin not allowed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import completion_request
from tests.processes import NEEDS_CHROMIUM, QPServer

PAGE = Path(__file__).parent / "browser" / "stream.html"
ARTIFACTS = Path(__file__).parent / "artifacts"
PAGE_PORT = 5173
CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    fake = FakeOpenRouter().start()
    fake.scripts["paced"] = Script(chunks=[(0.3, chunk) for chunk in CHUNKS])
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def api(fake, tmp_path_factory) -> Iterator[QPServer]:
    server = QPServer(
        tmp_path_factory.mktemp("qp-browser"),
        {"QP_OPENROUTER_URL": fake.url, "OPENROUTER_API_KEY": "server-key"},
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def page_server() -> AsyncIterator[None]:
    """Serves the page on port 5173 of both loopback addresses: the same page is
    http://localhost:5173 (allowed) and http://127.0.0.1:5173 (not allowed)."""
    request = completion_request("script:paced", "browser-test")
    html = PAGE.read_text().replace("__REQUEST__", json.dumps(request))

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for host in ("127.0.0.1", "::1"):
            try:
                await web.TCPSite(runner, host, PAGE_PORT).start()
            except OSError as err:
                if host == "127.0.0.1":
                    pytest.skip(f"port {PAGE_PORT} is taken: {err}")
        yield
    finally:
        await runner.cleanup()


async def open_page(browser, url: str, name: str):
    page = await browser.new_page()
    await page.goto(url)
    try:
        await page.wait_for_function(
            "document.getElementById('status').textContent.match(/^(done|error)/)",
            timeout=15_000,
        )
    except Exception:
        await screenshot(page, name)
        raise
    return page


async def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


async def test_an_allowed_origin_streams_the_completion(api, fake, page_server, browser):
    page = await open_page(browser, f"http://localhost:{PAGE_PORT}/?api={api.url}", "allowed")
    try:
        status = await page.text_content("#status")
        text = await page.text_content("#out")
        assert status.startswith("done after "), status
        assert text == b"".join(CHUNKS).decode()
        # Paced 0.3 s apart upstream, the tokens reached the page in more than one read.
        assert int(status.split()[2]) >= 2, status
    except AssertionError:
        await screenshot(page, "allowed")
        raise


async def test_a_disallowed_origin_is_refused_by_the_browser(api, fake, page_server, browser):
    before = len(fake.received)
    page = await open_page(browser, f"http://127.0.0.1:{PAGE_PORT}/?api={api.url}", "refused")
    try:
        status = await page.text_content("#status")
        assert status.startswith("error: TypeError"), status
        assert await page.text_content("#out") == ""
        # The preflight was refused, so the completion never went upstream.
        assert len(fake.received) == before
    except AssertionError:
        await screenshot(page, "refused")
        raise
