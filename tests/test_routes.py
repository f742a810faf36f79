"""Routing, CORS basics and logging, in-process; the log of a real process."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.helpers import call, create, make_chat


async def wait_for_log(server, text: str, seconds: float = 3.0) -> str:
    """Access lines are written in batches; wait until `text` shows up."""
    deadline = asyncio.get_running_loop().time() + seconds
    while text not in (log := server.log()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} not in the log:\n{log}")
        await asyncio.sleep(0.05)
    return log


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/api"),
        ("GET", "/api/nothing"),
        ("POST", "/api/chats/abc/extra"),
        ("GET", "/index.html"),
        ("DELETE", "/api/chat/abc"),
    ],
)
async def test_unknown_route_is_404_json(http, method, path):
    assert await call(http, method, path) == (404, {"error": "Not found"})


async def test_unsupported_method_on_a_known_path_is_405_json_with_allow(http):
    async with http.patch("/api/chats/abc") as response:
        assert response.status == 405
        assert await response.json() == {"error": "Method not allowed"}
        allowed = {m.strip() for m in response.headers["Allow"].split(",")}
        assert {"GET", "PUT", "DELETE"} <= allowed


async def test_allowed_origin_gets_cors_headers_on_success_and_error(http):
    origin = "http://localhost:5173"
    for path in ("/api/chats/unknown-chat", "/api/chats?app=x"):
        async with http.get(path, headers={"Origin": origin}) as response:
            assert response.status in (401, 404)
            assert response.headers["Access-Control-Allow-Origin"] == origin
            assert "Origin" in response.headers.getall("Vary")


async def test_disallowed_origin_gets_no_allow_origin_header(http):
    async with http.get("/api/chats/x", headers={"Origin": "https://evil.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_preflight_from_allowed_origin_allows_the_contract_methods_and_headers(http):
    async with http.options(
        "/api/chats/abc",
        headers={
            "Origin": "https://nwb.neurosift.app",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    ) as response:
        assert 200 <= response.status < 300
        assert response.headers["Access-Control-Allow-Origin"] == "https://nwb.neurosift.app"
        assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, DELETE, OPTIONS"
        assert (
            response.headers["Access-Control-Allow-Headers"]
            == "Content-Type, x-openrouter-key, x-admin-key"
        )
        assert response.headers["Access-Control-Max-Age"] == "86400"


async def test_log_has_one_line_per_request_without_contents_or_ids(qp_server, app_name):
    server = qp_server()  # what the process writes to its log, so a real process
    async with aiohttp.ClientSession(server.url) as http:
        await _log_two_requests(http, server, app_name)


async def _log_two_requests(http, server, app_name):
    secret_text = "SECRET-MESSAGE-CONTENT-4711"
    chat_id = await create(
        http, make_chat(app=app_name, messages=[{"role": "user", "content": secret_text}])
    )
    await call(http, "GET", f"/api/chats/{chat_id}", headers={"x-admin-key": "key-material-9"})
    log = await wait_for_log(server, "GET /api/chats/{chat_id} 200")
    assert secret_text not in log
    assert chat_id not in log
    assert "key-material-9" not in log
    assert "POST /api/chats 200" in log
    assert "GET /api/chats/{chat_id} 200" in log
