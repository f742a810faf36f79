"""The app under test in-process: `create_app` on aiohttp's test server, on a loopback port
in the test's own event loop, and where its blobs are."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.processes import SeaweedFS, psql


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

    def __init__(self, client: TestClient, data_dir: Path, backend: Backend, database: Database):
        self.client = client
        self.data_dir = data_dir
        self.backend = backend
        self.database = database

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def app(self) -> web.Application:
        app = self.client.app
        assert app is not None
        return app

    def blob_key_of(self, chat_id: str) -> str:
        """Where the chat's row says its messages are (copy-on-write: the row's revision)."""
        found = self.database.rows("SELECT blob_rev FROM chats WHERE chat_id = ?", (chat_id,))
        assert found, f"no row for chat {chat_id}"
        rev = found[0]["blob_rev"]
        return f"chats/{chat_id}/{rev}.json" if rev else f"chats/{chat_id}.json"

    async def stop(self) -> None:
        """Shut the app down as the server does: queued ledger rows are written, storage
        closed. Stopping twice is harmless."""
        await self.client.close()


class Database:
    """The server's database, read and written behind its back by the tests: its SQLite
    file, or its PostgreSQL database (through psql, so it works with the server stopped)."""

    def __init__(self, data_dir: Path, postgres_url: str | None):
        self.path = data_dir / "qp.sqlite3"
        self.postgres_url = postgres_url

    def env(self) -> dict[str, str]:
        """What points the operators' tools (python -m qp) at this database."""
        return {"QP_DATABASE": self.postgres_url} if self.postgres_url else {}

    def rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        """The rows of a query, as dicts by column name."""
        if self.postgres_url is None:
            with sqlite3.connect(self.path) as db:
                db.row_factory = sqlite3.Row
                return [dict(row) for row in db.execute(sql, params)]
        found = self._psql(f"SELECT COALESCE(json_agg(row), '[]') FROM ({sql}) AS row", params)
        return orjson.loads(found)

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        if self.postgres_url is None:
            with sqlite3.connect(self.path) as db:
                db.executemany(sql, rows)
            return
        for row in rows:
            self._psql(sql, row)

    def _psql(self, sql: str, params: tuple) -> str:
        """Run one statement with psql; `?` placeholders take `params` as literals."""
        assert self.postgres_url is not None
        parts = sql.split("?")
        assert len(parts) == len(params) + 1, "one parameter per ?"
        text = parts[0] + "".join(
            sql_literal(value) + part for value, part in zip(params, parts[1:], strict=True)
        )
        return psql(self.postgres_url, text)


def sql_literal(value: Any) -> str:
    """A value as SQL text, for statements sent through psql."""
    if value is None:
        return "NULL"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


StartServer = Callable[..., Awaitable[AppServer]]
