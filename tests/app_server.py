"""The app under test in-process: `create_app` on aiohttp's test server, on a loopback port
in the test's own event loop, and where its blobs are."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.processes import SeaweedFS


class Backend:
    """Where one server keeps its blobs: a folder in its data folder, or a prefix of its
    own in a SeaweedFS bucket. Tests read and remove blobs behind the server's back here."""

    def __init__(self, name: str, data_dir: Path, weed: SeaweedFS | None, bucket: str | None):
        self.name = name
        self.blob_root = data_dir / "blobs"
        self.weed = weed
        self.bucket = bucket
        self.prefix = f"{data_dir.name}/"

    def env(self) -> dict[str, str]:
        if self.weed and self.bucket:
            return self.weed.server_env(self.bucket, self.prefix)
        return {}

    def read_blob(self, key: str) -> bytes | None:
        if self.weed and self.bucket:
            return self.weed.get_object(self.bucket, self.prefix + key)
        path = self.blob_root / key
        return path.read_bytes() if path.exists() else None

    def remove_blob(self, key: str) -> None:
        if self.weed and self.bucket:
            self.weed.client().delete_object(Bucket=self.bucket, Key=self.prefix + key)
        else:
            (self.blob_root / key).unlink()


class AppServer:
    """The app on a loopback port in the test's own event loop; `client` sends requests."""

    def __init__(self, client: TestClient, data_dir: Path, backend: Backend):
        self.client = client
        self.data_dir = data_dir
        self.backend = backend

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def app(self) -> web.Application:
        app = self.client.app
        assert app is not None
        return app

    async def stop(self) -> None:
        """Shut the app down as the server does: queued ledger rows are written, storage
        closed. Stopping twice is harmless."""
        await self.client.close()


StartServer = Callable[..., Awaitable[AppServer]]
