"""Fixtures: qp-server as a real process on each storage backend, and a real SeaweedFS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.support import QPServer, SeaweedFS

ADMIN_KEY = "test-admin-key"
BACKENDS = ["file", "s3"]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; each server gets its own bucket on it."""
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start()
    yield weed
    weed.stop()


class Backend:
    """Storage settings for one server: a fresh folder or a fresh bucket."""

    def __init__(self, name: str, request: pytest.FixtureRequest):
        self.name = name
        self._request = request
        self.bucket: str | None = None

    def env(self) -> dict[str, str]:
        if self.name == "file":
            return {}
        weed: SeaweedFS = self._request.getfixturevalue("seaweed")
        self.bucket = weed.create_bucket()
        return weed.server_env(self.bucket)


@pytest.fixture(scope="module", params=BACKENDS)
def backend_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(backend_name, request, tmp_path_factory) -> Iterator[QPServer]:
    """A server shared by a module's tests on one backend; tests use their own ids and apps."""
    backend = Backend(backend_name, request)
    env = {"ADMIN_KEY": ADMIN_KEY, **backend.env()}
    qp = QPServer(tmp_path_factory.mktemp(f"qp-{backend_name}"), env).start()
    qp.backend = backend
    yield qp
    qp.stop()


@pytest.fixture
def start_server(backend_name, request, tmp_path_factory) -> Iterator[Callable[..., QPServer]]:
    """Start a server of the test's own, with extra environment; stopped after the test."""
    started: list[QPServer] = []

    def start(**env: str) -> QPServer:
        backend = Backend(backend_name, request)
        qp = QPServer(
            tmp_path_factory.mktemp(f"qp-{backend_name}"),
            {"ADMIN_KEY": ADMIN_KEY, **backend.env(), **env},
        ).start()
        qp.backend = backend
        started.append(qp)
        return qp

    yield start
    for qp in started:
        qp.stop()


@pytest.fixture
def qp_server(tmp_path) -> Iterator[Callable[..., QPServer]]:
    """Start a server on the file store with the given environment; stopped after the test."""
    started: list[QPServer] = []

    def start(name: str = "qp", **env: str) -> QPServer:
        qp = QPServer(tmp_path / name, {"ADMIN_KEY": ADMIN_KEY, **env}).start()
        started.append(qp)
        return qp

    yield start
    for qp in started:
        qp.stop()


@pytest.fixture
async def http(server) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(server.url) as session:
        yield session


@pytest.fixture
def app_name() -> str:
    """An app name no other test uses, so tests sharing a server do not see each other."""
    return f"app-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin() -> dict[str, str]:
    return {"x-admin-key": ADMIN_KEY}
