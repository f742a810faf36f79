"""Requests the server cannot read, in every state of the database: a body that is not
JSON, one whose Content-Encoding does not decode, one the HTTP parser refuses, on every
route that takes a body. None is ever a 500: with PostgreSQL up (or the rate limits off)
each gets its 400; with PostgreSQL stopped and the rate limits on, where the shared counts
are out of reach, the 503 a well-formed request gets."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.processes import PostgresServer, QPServer

ROUTES = [("POST", "/api/chats"), ("PUT", "/api/chats/abc"), ("POST", "/api/completion")]
LIMITS = {"QP_RATE_LIMIT_CHATS": "300/minute", "QP_RATE_LIMIT_COMPLETION": "100/minute"}


def with_body(method: str, path: str, headers: str, body: bytes) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: qp\r\nConnection: close\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def unreadable(method: str, path: str) -> dict[str, tuple[bytes, tuple[int, dict]]]:
    """Each way of sending `method path` a body it cannot read, and its answer."""
    json_type = "Content-Type: application/json\r\n"
    return {
        "not-json": (with_body(method, path, json_type, b"{"), INVALID_JSON),
        "not-utf8": (with_body(method, path, json_type, b'{"chat": "\xff"}'), INVALID_JSON),
        "bad-gzip": (with_body(method, path, "Content-Encoding: gzip\r\n", b"abcd"), BAD_REQUEST),
        "bad-chunk": (
            f"{method} {path} HTTP/1.1\r\nHost: qp\r\nTransfer-Encoding: chunked\r\n\r\n"
            "zz\r\n{}\r\n0\r\n\r\n".encode(),
            BAD_REQUEST,
        ),
        "bad-header": (
            f"{method} {path} HTTP/1.1\r\nHost: qp\r\nNo Colon Here\r\n\r\n".encode(),
            BAD_REQUEST,
        ),
    }


INVALID_JSON = (400, {"error": "Invalid JSON body"})
BAD_REQUEST = (400, {"error": "Bad request"})
UNAVAILABLE = (503, {"error": "Storage unavailable"})


async def exchange(server: QPServer, raw: bytes) -> tuple[int, dict]:
    """Send `raw`, read the answer until the server closes: its status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, answer
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL of this module's own, which its tests stop."""
    own = PostgresServer(Path(tempfile.mkdtemp(prefix="qp-pg-unreadable-"))).start()
    yield own
    own.stop()
    shutil.rmtree(own.data_dir, ignore_errors=True)


@pytest.fixture
def servers(own_postgres, tmp_path):
    """Two servers on one database, the rate limits on and off."""
    url = own_postgres.create_database()
    limited = QPServer(tmp_path / "limited", {"QP_DATABASE": url, **LIMITS}).start()
    unlimited = QPServer(tmp_path / "unlimited", {"QP_DATABASE": url}).start()
    try:
        yield limited, unlimited
    finally:
        for server in (limited, unlimited):
            server.stop()
    for server in (limited, unlimited):
        assert "Traceback" not in server.log()
        assert " 500 " not in server.log()


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_an_unreadable_request_is_a_400_with_postgresql_up(servers, method, path):
    for kind, (raw, answer) in unreadable(method, path).items():
        for server in servers:
            assert (kind, await exchange(server, raw)) == (kind, answer)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_an_unreadable_request_is_never_a_500_with_postgresql_stopped(
    servers, own_postgres, method, path
):
    limited, unlimited = servers
    own_postgres.stop("immediate")
    try:
        for kind, (raw, answer) in unreadable(method, path).items():
            assert (kind, await exchange(limited, raw)) == (kind, UNAVAILABLE)
            assert (kind, await exchange(unlimited, raw)) == (kind, answer)
    finally:
        own_postgres.resume()
