"""deploy/nginx.conf in front of the real server: real nginx, qp-server and a fake OpenRouter.

The site file is used as written; only the listen line (a free port on 127.0.0.1) and the
upstream (a socket or port of the test's own) change. Both upstream modes run: the unix
socket the file ships with, and the TCP line it carries commented out.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, a_fresh_minute, call, completion_request, make_chat
from tests.processes import NEEDS_NGINX, ROOT, Nginx, QPServer, free_ports

pytestmark = NEEDS_NGINX

SITE = ROOT / "deploy" / "nginx.conf"
MIB = 1024 * 1024
MODES = ["unix", "tcp"]


# --- the site file, rewritten only for ports and paths -----------------------------------


def _replace_once(pattern: str, replacement: str, text: str) -> str:
    text, count = re.subn(pattern, lambda match: match[1] + replacement, text, flags=re.M)
    assert count == 1, f"deploy/nginx.conf: expected one line matching {pattern!r}"
    return text


def site_config(port: int, unix_socket: Path | None = None, tcp_port: int = 0) -> str:
    """deploy/nginx.conf listening on 127.0.0.1:`port` only, proxying to the test's server."""
    text = SITE.read_text()
    unix_line = r"^([ \t]*)server unix:/run/qp/qp\.sock;"
    if unix_socket is not None:
        text = _replace_once(unix_line, f"server unix:{unix_socket};", text)
    else:
        # The TCP variant: the unix line off, the commented TCP line on.
        text = _replace_once(unix_line, "# server unix:/run/qp/qp.sock;", text)
        text = _replace_once(
            r"^([ \t]*)# server 127\.0\.0\.1:8787;", f"server 127.0.0.1:{tcp_port};", text
        )
    # Every active listen line goes; one on loopback takes the first one's place.
    listens = 0

    def listen(match: re.Match) -> str:
        nonlocal listens
        listens += 1
        return f"{match[1]}listen 127.0.0.1:{port};\n" if listens == 1 else ""

    text = re.sub(r"^([ \t]*)listen[ \t][^;#]*;[ \t]*\n", listen, text, flags=re.M)
    active = [line.split("#")[0].split() for line in text.splitlines()]
    assert [words for words in active if words[:1] == ["listen"]] == [
        ["listen", f"127.0.0.1:{port};"]
    ], "deploy/nginx.conf: the test could not confine nginx to 127.0.0.1"
    return text


# --- processes -----------------------------------------------------------------------------


def start_stack(mode: str, tmp: Path, fake: FakeOpenRouter, **env: str) -> tuple[QPServer, Nginx]:
    """qp-server (on a unix socket or a TCP port) and nginx in front of it."""
    env = {
        "ADMIN_KEY": ADMIN_KEY,
        "OPENROUTER_API_KEY": "server-key",
        "QP_OPENROUTER_URL": fake.url,
        **env,
    }
    unix_socket = tmp / "qp.sock" if mode == "unix" else None
    qp = QPServer(tmp / "qp", env, unix_socket=unix_socket).start()
    (port,) = free_ports()
    site = site_config(port, unix_socket=unix_socket, tcp_port=qp.port)
    try:
        nginx = Nginx(tmp / "nginx", site, port).start()
    except Exception:
        qp.stop()
        raise
    return qp, nginx


@pytest.fixture(scope="module", params=MODES)
def stack(request, fake, tmp_path_factory) -> Iterator[Nginx]:
    """nginx in front of a server without rate limits."""
    qp, nginx = start_stack(request.param, tmp_path_factory.mktemp(f"nginx-{request.param}"), fake)
    yield nginx
    nginx.stop()
    qp.stop()


@pytest.fixture(scope="module", params=MODES)
def limited(request, fake, tmp_path_factory) -> Iterator[Nginx]:
    """nginx in front of a server allowing each client one chats request a minute."""
    tmp = tmp_path_factory.mktemp(f"nginx-limited-{request.param}")
    qp, nginx = start_stack(request.param, tmp, fake, QP_RATE_LIMIT_CHATS="1/minute")
    yield nginx
    nginx.stop()
    qp.stop()


@pytest.fixture
async def http(stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(stack.url) as session:
        yield session


def body_of_size(total: int) -> bytes:
    """A create body of exactly `total` bytes."""
    base = orjson.dumps({"chat": make_chat(messages=[""])})
    padding = total - len(base)
    return base.replace(b'"messages":[""]', b'"messages":["' + b"a" * padding + b'"]')


JSON = {"Content-Type": "application/json"}


# --- streams --------------------------------------------------------------------------------


async def test_stream_chunks_pass_nginx_as_they_are_sent(http, fake):
    fake.scripts["nginx-paced"] = Script(
        chunks=[(0.0, b"data: one\n\n"), (1.0, b"data: two\n\n"), (0.0, b"data: [DONE]\n\n")]
    )
    async with http.post(
        "/api/completion", json=completion_request("script:nginx-paced")
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        # nginx acts on X-Accel-Buffering and keeps it from the client.
        assert "X-Accel-Buffering" not in response.headers
        first = await response.content.readany()
        first_at = time.monotonic()
        rest = await response.read()
    sent = fake.last().sent
    assert first == b"data: one\n\n"
    assert rest == b"data: two\n\ndata: [DONE]\n\n"
    # The first chunk is through nginx at once, not held until the second (1 s later).
    assert first_at - sent[0][0] < 0.5
    assert first_at < sent[1][0] - 0.5


# --- the operator's page ---------------------------------------------------------------------


async def test_the_operators_page_and_its_data_pass_nginx(http):
    async with http.get("/admin") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
    async with http.get("/admin/static/admin.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
    assert (await call(http, "GET", "/api/admin/apps"))[0] == 401
    status, body = await call(http, "GET", "/api/admin/apps", headers={"x-admin-key": ADMIN_KEY})
    assert (status, list(body)) == (200, ["apps"])


# --- sizes ------------------------------------------------------------------------------------


async def test_a_9_mib_chat_goes_through_and_comes_back_equal(http):
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}:" + "ü" * (MIB // 2)}
        for i in range(9)
    ]
    body = orjson.dumps({"chat": make_chat(app="nginx-big", messages=messages)})
    assert 9 * MIB < len(body) < 10 * MIB
    status, answer = await call(http, "POST", "/api/chats", data=body, headers=JSON)
    assert status == 200, answer
    status, chat = await call(http, "GET", f"/api/chats/{answer['chatId']}")
    assert status == 200
    assert chat["chatId"] == answer["chatId"]
    assert (chat["app"], chat["messages"]) == ("nginx-big", messages)


async def test_a_body_over_10_mib_gets_the_servers_json_413(http):
    status, answer = await call(
        http, "POST", "/api/chats", data=body_of_size(10 * MIB + MIB // 2), headers=JSON
    )
    assert (status, answer) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Request body too large: 10.5 MB (max: 10.0 MB)",
        },
    )


async def test_a_chunked_body_over_10_mib_gets_the_servers_json_413_too(http):
    body = body_of_size(10 * MIB + MIB // 2)

    async def chunks():
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    # nginx buffers the chunked upload and passes it on with its length.
    status, answer = await call(http, "POST", "/api/chats", data=chunks(), headers=JSON)
    assert (status, answer) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Request body too large: 10.5 MB (max: 10.0 MB)",
        },
    )


async def test_a_body_over_11_mib_is_refused_by_nginx_itself(http):
    # client_max_body_size 11m: beyond it nginx answers first, with its own HTML page.
    async with http.post("/api/chats", data=body_of_size(12 * MIB), headers=JSON) as response:
        assert response.status == 413
        assert response.content_type == "text/html"
        assert "413 Request Entity Too Large" in await response.text()


# --- client addresses and rate limits ---------------------------------------------------


def refused() -> tuple[int, dict]:
    return (
        429,
        {
            "error": "Rate limit exceeded",
            "retryAfter": 60,
            "message": "Rate limit exceeded: 1 requests per minute",
        },
    )


NOT_FOUND = (404, {"error": "Chat not found"})


async def test_clients_are_told_apart_by_the_address_nginx_forwards(limited):
    first = {"X-Forwarded-For": "203.0.113.7"}
    second = {"X-Forwarded-For": "203.0.113.8"}
    async with aiohttp.ClientSession(limited.url) as http:
        await a_fresh_minute()
        # Both arrive from 127.0.0.1; nginx forwards "203.0.113.x, 127.0.0.1" and the server
        # takes the right-most address that is not a trusted proxy.
        assert await call(http, "GET", "/api/chats/x", headers=first) == NOT_FOUND
        assert await call(http, "GET", "/api/chats/x", headers=second) == NOT_FOUND
        assert await call(http, "GET", "/api/chats/x", headers=first) == refused()
        assert await call(http, "GET", "/api/chats/x", headers=second) == refused()


async def test_a_client_cannot_hide_behind_an_address_on_the_left(limited):
    async with aiohttp.ClientSession(limited.url) as http:
        await a_fresh_minute()
        headers = {"X-Forwarded-For": "198.51.100.1, 203.0.113.20"}
        assert await call(http, "GET", "/api/chats/x", headers=headers) == NOT_FOUND
        # Another address on the left changes nothing: the client is still 203.0.113.20.
        headers = {"X-Forwarded-For": "198.51.100.2, 203.0.113.20"}
        assert await call(http, "GET", "/api/chats/x", headers=headers) == refused()


async def test_without_x_forwarded_for_the_client_is_127_0_0_1(limited):
    async with aiohttp.ClientSession(limited.url) as http:
        await a_fresh_minute()
        # nginx sends "X-Forwarded-For: 127.0.0.1": its peer, a trusted proxy, so that is who
        # the client is.
        assert await call(http, "GET", "/api/chats/x") == NOT_FOUND
        # A request whose chain holds only 127.0.0.1 is the same client, already counted...
        loopback = {"X-Forwarded-For": "127.0.0.1"}
        assert await call(http, "GET", "/api/chats/x", headers=loopback) == refused()
        # ...while another address still has its own allowance.
        other = {"X-Forwarded-For": "203.0.113.30"}
        assert await call(http, "GET", "/api/chats/x", headers=other) == NOT_FOUND
