"""CORS with exact origins and patterns, on every answer, served in-process on a loopback port."""

from __future__ import annotations

import pytest

from tests.helpers import a_fresh_minute, make_chat

ALLOWED = [
    "http://localhost:5173",
    "http://nwb.localhost:5173",
    "http://a-b-9.localhost:5173",
    "https://nwb.neurosift.app",
    "https://a.b.c.neurosift.app",
    "https://magland.github.io",
    "https://dandi.github.io",
    "https://medit.dandiarchive.org",
    "https://dandiset-metadata-assistant.surge.sh",
    "https://airesearchcoach.org",
]
REFUSED = [
    "https://neurosift.app.evil.example",
    "https://nwb.neurosift.app.evil.example",
    "http://a.b.localhost:5173",
    "http://localhost:5174",
    "http://nwb.localhost:5173.evil.example",
    "https://neurosift.app",
    "https://xneurosift.app",
    "http://nwb.neurosift.app",
    "https://evil.example",
    "https://magland.github.io.evil.example",
    "null",
]


@pytest.mark.parametrize("origin", ALLOWED)
async def test_allowed_origin_gets_its_origin_back(http, origin):
    async with http.get("/api/chats/nope", headers={"Origin": origin}) as response:
        assert response.status == 404
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers.getall("Vary")


@pytest.mark.parametrize("origin", REFUSED)
async def test_other_origins_never_get_the_header(http, origin):
    async with http.get("/api/chats/nope", headers={"Origin": origin}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.options(
        "/api/chats",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
        assert response.status >= 400


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/api/chats", {"data": b"{bad"}, 400),
        ("POST", "/api/chats", {"json": {"chat": 1}}, 400),
        ("GET", "/api/chats/unknown", {}, 404),
        ("GET", "/api/chats?app=a", {}, 401),
        ("GET", "/api/no-such-route", {}, 404),
        ("PATCH", "/api/chats", {}, 405),
        ("POST", "/api/completion", {"json": {}}, 400),
    ],
)
async def test_errors_carry_the_cors_headers(http, method, path, kwargs, status):
    origin = "https://nwb.neurosift.app"
    async with http.request(method, path, headers={"Origin": origin}, **kwargs) as response:
        assert response.status == status
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers.getall("Vary")
        assert response.content_type == "application/json"


async def test_a_429_carries_the_cors_headers(start_server):
    origin = "http://localhost:5173"
    server = await start_server(QP_RATE_LIMIT_CHATS="2/minute")
    await a_fresh_minute()
    statuses = []
    for _ in range(3):
        async with server.client.post(
            "/api/chats", json={"chat": make_chat()}, headers={"Origin": origin}
        ) as response:
            statuses.append(response.status)
            last = response
    assert statuses == [200, 200, 429]
    assert last.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/api/chats", "POST", "content-type"),
        ("/api/chats/abc", "PUT", "content-type"),
        ("/api/chats/abc", "DELETE", "x-admin-key"),
        ("/api/completion", "POST", "content-type, x-openrouter-key"),
    ],
)
async def test_preflight_from_an_allowed_origin(http, path, method, headers):
    origin = "http://nwb.localhost:5173"
    async with http.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    ) as response:
        assert 200 <= response.status < 300
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, DELETE, OPTIONS"
        assert (
            response.headers["Access-Control-Allow-Headers"]
            == "Content-Type, x-openrouter-key, x-admin-key"
        )
        assert response.headers["Access-Control-Max-Age"] == "86400"
