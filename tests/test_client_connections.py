"""Connections a client cannot keep or multiply: slow headers, slow and endless bodies, idle
keep-alives, more connections than allowed; requests the HTTP parser rejects answered in
JSON and counted; a log that stays small and holds no secret whatever the requests carry."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest

from tests.helpers import ADMIN_KEY, a_fresh_minute, call, create, make_chat


async def connect(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    received = b""
    async with asyncio.timeout(seconds):
        try:
            while piece := await reader.read(65536):
                received += piece
        except ConnectionError:
            pass  # closed with a reset: what it sent before is what counts
    return received


def parse_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def test_headers_too_slow_close_the_connection(qp_server):
    server = qp_server(QP_HEADER_TIMEOUT="1")
    reader, writer = await connect(server)
    started = time.monotonic()
    writer.write(b"GET /api/chats/x HTTP/1.1\r\nHost: qp\r\n")
    try:
        for _ in range(20):  # a header line every 0.2 s, never the end of the headers
            await asyncio.sleep(0.2)
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    assert await closed_within(reader, 5) == b""
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_body_that_goes_quiet_is_408_and_closed(qp_server):
    server = qp_server(QP_BODY_IDLE_TIMEOUT="1")
    reader, writer = await connect(server)
    writer.write(
        b"POST /api/chats HTTP/1.1\r\nHost: qp\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"chat": '
    )
    started = time.monotonic()
    answer = await closed_within(reader, 5)
    assert time.monotonic() - started < 3
    assert parse_answer(answer) == (
        408,
        {"error": "Request timeout", "message": "The request body came too slowly"},
    )
    writer.close()


async def test_an_endless_trickle_of_chunks_is_cut_at_the_body_timeout(qp_server):
    server = qp_server(QP_BODY_TIMEOUT="2", QP_BODY_IDLE_TIMEOUT="1")
    reader, writer = await connect(server)
    writer.write(
        b"PUT /api/chats/x HTTP/1.1\r\nHost: qp\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    started = time.monotonic()

    async def trickle() -> None:
        while True:
            writer.write(b"1\r\n \r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    feeding = asyncio.create_task(trickle())
    try:
        answer = await closed_within(reader, 6)
    finally:
        feeding.cancel()
    assert time.monotonic() - started < 4
    assert parse_answer(answer)[0] == 408
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(qp_server):
    server = qp_server(QP_KEEPALIVE_TIMEOUT="1")
    reader, writer = await connect(server)
    writer.write(b"GET /api/chats/x HTTP/1.1\r\nHost: qp\r\n\r\n")
    await writer.drain()
    started = time.monotonic()
    answer = await closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 404")
    assert time.monotonic() - started < 3
    writer.close()


async def test_connections_past_the_limit_get_503_and_the_server_carries_on(qp_server):
    server = qp_server(QP_MAX_CONNECTIONS="20")
    held = [await connect(server) for _ in range(20)]
    await asyncio.sleep(0.2)
    refused = []
    for _ in range(30):
        reader, writer = await connect(server)
        refused.append(await closed_within(reader, 5))
        writer.close()
    for raw in refused:
        assert parse_answer(raw) == (503, {"error": "Service unavailable"})
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession(server.url) as http:
        assert (await call(http, "GET", "/api/chats/x"))[0] == 404
    server.stop()
    refusals = re.findall("connections open: refusing new ones", server.log())
    assert 1 <= len(refusals) <= 5, "one line a second at most"


MALFORMED = [
    b"GET /api/chats/x HTTP/1.1\r\nHost: qp\r\nx-admin-key: bad\x01key\r\n\r\n",
    b"GET /api/chats/x HTTP/1.1\r\nHost: qp\r\nBad Header\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=["control", "no-colon", "nul", "long", "junk"])
async def test_a_request_the_parser_rejects_is_a_json_400(qp_server, raw):
    server = qp_server()
    reader, writer = await connect(server)
    writer.write(raw)
    answer = await closed_within(reader, 5)
    assert parse_answer(answer) == (400, {"error": "Bad request"})
    assert b"Content-Type: application/json" in answer
    writer.close()
    server.stop()
    assert "Traceback" not in server.log()


async def test_rejected_requests_count_against_the_clients_rate_limit(qp_server):
    server = qp_server(QP_RATE_LIMIT_CHATS="3/minute")
    await a_fresh_minute()
    statuses = []
    for _ in range(5):
        reader, writer = await connect(server)
        writer.write(MALFORMED[0])
        statuses.append(parse_answer(await closed_within(reader, 5))[0])
        writer.close()
    assert statuses == [400, 400, 400, 429, 429]
    async with aiohttp.ClientSession(server.url) as http:
        status, body = await call(http, "GET", "/api/chats/x")
    assert (status, body["error"]) == (429, "Rate limit exceeded")


async def test_a_hostile_run_leaves_no_secret_in_a_small_log(qp_server):
    server = qp_server(
        QP_LOG_FORMAT="json", OPENROUTER_API_KEY="sk-or-server-key", QP_RATE_LIMIT_CHATS="off"
    )
    secrets = {
        "admin": "adm\x01in-SECRET-1",
        "openrouter": "sk-or\x7f-SECRET-2",
        "plain admin": "SECRET-3-admin",
    }
    async with aiohttp.ClientSession(server.url) as http:
        chat_id = await create(http, make_chat(app="secret-app"))
        for _ in range(300):
            for raw in (
                b"GET /api/chats/"
                + chat_id.encode()
                + b" HTTP/1.1\r\nx-admin-key: "
                + secrets["admin"].encode()
                + b"\r\n\r\n",
                b"POST /api/completion HTTP/1.1\r\nx-openrouter-key: "
                + secrets["openrouter"].encode()
                + b"\r\n\r\n",
                b"DELETE /api/chats/" + chat_id.encode() + b"\x00 HTTP/1.1\r\n\r\n",
            ):
                reader, writer = await connect(server)
                writer.write(raw)
                await closed_within(reader, 5)
                writer.close()
            await call(
                http,
                "GET",
                "/api/chats?app=secret-app",
                headers={"x-admin-key": secrets["plain admin"]},
            )
    server.stop()
    log = server.log()
    for secret in (*secrets.values(), chat_id, ADMIN_KEY, "sk-or-server-key", "SECRET"):
        assert secret not in log
    assert "Traceback" not in log
    # 1,200 hostile requests in a few seconds: the access log keeps at most 20 a second for
    # one client, and says how many it held back.
    assert len(log.splitlines()) < 400
    assert "access lines held back in one second" in log
