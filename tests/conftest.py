"""Fixtures. Handler behaviour is tested in-process: `create_app(config, policy)` served by
pytest-aiohttp's `aiohttp_client` on a loopback port (`start_server`, `server`, `http`).
What needs a real `server.py` process (start-up and its refusals, signals, crashes, nginx)
uses `qp_server`. S3 runs on a real SeaweedFS (`seaweed`)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from qp.app import create_app
from qp.config import load_config
from qp.policy.loader import load_policy
from tests.app_server import AppServer, Backend, StartServer
from tests.fake_openrouter import FakeOpenRouter
from tests.helpers import ADMIN_KEY
from tests.processes import CHROMIUM, TEST_DEFAULTS, QPServer, SeaweedFS

BACKENDS = ["file", "s3"]
# What a test run's own environment must not pass on to the server under test.
SERVER_VARIABLES = ("QP_", "OPENROUTER_", "AWS_", "ADMIN_KEY")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked `on_both_backends` run each test on the file store and on S3."""
    if "backend_name" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("on_both_backends") is not None
        metafunc.parametrize("backend_name", BACKENDS if both else ["file"], scope="module")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; process tests make buckets of their own on it."""
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start()
    yield weed
    weed.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    """A fake OpenRouter on a real port, shared by a module's tests."""
    fake = FakeOpenRouter().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def shared_bucket(seaweed: SeaweedFS) -> str:
    """The bucket in-process servers share, each under a prefix of its own (making a
    bucket takes SeaweedFS up to two seconds)."""
    return seaweed.create_bucket()


@pytest.fixture
async def start_server(
    backend_name: str, request: pytest.FixtureRequest, tmp_path_factory, aiohttp_client
) -> StartServer:
    """Start the app on a fresh data folder (and bucket), with extra environment."""

    async def start(clock: Callable[[], float] = time.time, **env: str) -> AppServer:
        # A test may start the app again on an earlier one's data folder.
        data_dir = Path(env["QP_DATA_DIR"]) if "QP_DATA_DIR" in env else None
        data_dir = data_dir or tmp_path_factory.mktemp(f"qp-{backend_name}")
        on_s3 = backend_name == "s3"
        weed = request.getfixturevalue("seaweed") if on_s3 else None
        bucket = request.getfixturevalue("shared_bucket") if on_s3 else None
        backend = Backend(backend_name, data_dir, weed, bucket)
        environ = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("QP_", "OPENROUTER_", "AWS_")) and k != "ADMIN_KEY"
            },
            "QP_DATA_DIR": str(data_dir),
            "ADMIN_KEY": ADMIN_KEY,
            **TEST_DEFAULTS,
            **backend.env(),
            **env,
        }
        monkeypatch = request.getfixturevalue("monkeypatch")
        for name, value in backend.env().items():
            if name.startswith("AWS_"):  # botocore reads its credentials from the process
                monkeypatch.setenv(name, value)
        config = load_config(environ)
        app = create_app(config, load_policy(environ, config.config_path), clock)
        return AppServer(await aiohttp_client(app), data_dir, backend)

    return start


@pytest.fixture
async def server(start_server: StartServer) -> AppServer:
    return await start_server()


@pytest.fixture
async def http(server: AppServer) -> AsyncIterator[TestClient]:
    yield server.client


@pytest.fixture
def qp_server(tmp_path) -> Iterator[Callable[..., QPServer]]:
    """Start `server.py` as a real process on the file store with the given environment;
    stopped after the test."""
    started: list[QPServer] = []

    def start(name: str = "qp", **env: str) -> QPServer:
        qp = QPServer(tmp_path / name, {"ADMIN_KEY": ADMIN_KEY, **env}).start()
        started.append(qp)
        return qp

    yield start
    for qp in started:
        qp.stop()


@pytest.fixture
def app_name() -> str:
    """An app name no other test uses, so tests sharing a server do not see each other."""
    return f"app-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin() -> dict[str, str]:
    return {"x-admin-key": ADMIN_KEY}


@pytest.fixture
async def browser(tmp_path) -> AsyncIterator:
    """Debian's headless Chromium (never a downloaded one), driven by Playwright, with a
    fresh profile. Modules that use it skip themselves where it is not installed."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            viewport={"width": 1280, "height": 900},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield context
        finally:
            await context.close()
