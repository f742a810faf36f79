"""Fixtures. Handler behaviour is tested in-process: `create_app(config, policy)` served by
pytest-aiohttp's `aiohttp_client` on a loopback port (`start_server`, `server`, `http`).
What needs a real `server.py` process (start-up and its refusals, signals, crashes, nginx)
uses `qp_server`. S3 runs on a real SeaweedFS (`seaweed`), PostgreSQL on a real PostgreSQL
(`postgres`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from qp.app import create_app
from qp.config import load_config
from qp.policy.loader import load_policy
from tests.app_server import AppServer, Backend, Database, StartServer
from tests.fake_openrouter import FakeOpenRouter
from tests.helpers import ADMIN_KEY
from tests.processes import CHROMIUM, TEST_DEFAULTS, PostgresServer, QPServer, SeaweedFS
from tests.slow_s3 import SlowS3

BACKENDS = ["file", "s3"]
DATABASES = ["sqlite", "postgres"]
# What a test run's own environment must not pass on to the server under test.
SERVER_VARIABLES = ("QP_", "OPENROUTER_", "AWS_", "ADMIN_KEY")


# Modules that take minutes (schemathesis runs, CPU burners beside start-ups): run first, so
# that under pytest-xdist (`make test`) no worker is left with one of them at the end.
SLOW_FIRST = ("test_openapi.py", "test_startup.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked `on_both_backends` run each test on the file store and on S3."""
    if "backend_name" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("on_both_backends") is not None
        metafunc.parametrize("backend_name", BACKENDS if both else ["file"], scope="module")
    if "database_name" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("on_both_databases") is not None
        metafunc.parametrize("database_name", DATABASES if both else ["sqlite"], scope="module")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; each server under test gets a database of its own.
    Its folder is outside pytest's (which its `postgres` user could not enter)."""
    if PostgresServer.bindir() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="qp-postgres-"))
    server = PostgresServer(folder).start()
    yield server
    # Its data is thrown away: no shutdown checkpoint (a fast stop took 10 s at the end of
    # a loaded session, writing back the buffers of hundreds of databases).
    server.stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


# Data folder -> the PostgreSQL database of the server started on it (a restart reuses it).
_DATABASES: dict[Path, str] = {}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; process tests make buckets of their own on it."""
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start()
    yield weed
    # Its data is thrown away with the session: no need to wait for a graceful stop.
    weed.kill()


@pytest.fixture
def slow_s3(seaweed: SeaweedFS) -> Iterator[SlowS3]:
    """A proxy in front of SeaweedFS whose answers a test delays or holds."""
    proxy = SlowS3(seaweed.endpoint_url).start()
    yield proxy
    proxy.stop()


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
    backend_name: str,
    database_name: str,
    request: pytest.FixtureRequest,
    tmp_path_factory,
    aiohttp_client,
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
        if database_name == "postgres" and "QP_DATABASE" not in env:
            if data_dir not in _DATABASES:
                _DATABASES[data_dir] = request.getfixturevalue("postgres").create_database()
            environ["QP_DATABASE"] = _DATABASES[data_dir]
        monkeypatch = request.getfixturevalue("monkeypatch")
        for name, value in backend.env().items():
            if name.startswith("AWS_"):  # botocore reads its credentials from the process
                monkeypatch.setenv(name, value)
        config = load_config(environ)
        app = create_app(config, load_policy(environ, config.config_path), clock)
        database = Database(data_dir, environ.get("QP_DATABASE") if config.postgres_url else None)
        return AppServer(await aiohttp_client(app), data_dir, backend, database)

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
