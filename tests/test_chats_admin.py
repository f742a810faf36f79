"""The admin routes: GET /api/chats?app= and DELETE /api/chats/{chatId}."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.helpers import ADMIN_KEY, big_chat, call, create, make_chat, unique_id

pytestmark = [pytest.mark.on_both_backends, pytest.mark.on_both_databases]


@pytest.mark.parametrize("headers", [{}, {"x-admin-key": "wrong"}, {"x-admin-key": ""}])
async def test_list_without_the_admin_key_is_401(http, app_name, headers):
    assert await call(http, "GET", f"/api/chats?app={app_name}", headers=headers) == (
        401,
        {"error": "Unauthorized"},
    )


async def test_list_without_app_is_400(http, admin):
    assert await call(http, "GET", "/api/chats", headers=admin) == (
        400,
        {"error": "App parameter required"},
    )


async def test_admin_check_comes_before_the_app_check(http):
    assert await call(http, "GET", "/api/chats") == (401, {"error": "Unauthorized"})


async def test_list_gives_full_chats_newest_update_first(http, admin, app_name):
    ids = [await create(http, make_chat(app=app_name, messages=[f"m{i}"])) for i in range(3)]
    await asyncio.sleep(0.005)
    # Updating the oldest makes it the newest.
    update = make_chat(ids[0], app=app_name, messages=["m0", "again"])
    assert (await call(http, "PUT", f"/api/chats/{ids[0]}", json={"chat": update}))[0] == 200
    status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    assert status == 200
    assert [chat["chatId"] for chat in chats] == [ids[0], ids[2], ids[1]]
    assert chats[0]["messages"] == ["m0", "again"]
    for chat, single in zip(chats, [ids[0], ids[2], ids[1]], strict=True):
        assert (await call(http, "GET", f"/api/chats/{single}"))[1] == chat
    # Only this app's chats.
    assert {chat["app"] for chat in chats} == {app_name}


async def test_list_gives_at_most_100_chats(http, admin, app_name):
    sem = asyncio.Semaphore(16)

    async def one(i):
        async with sem:
            return await create(http, make_chat(app=app_name, messages=[i]))

    await asyncio.gather(*(one(i) for i in range(105)))
    status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    assert status == 200
    assert len(chats) == 100
    updated = [chat["updatedAt"] for chat in chats]
    assert updated == sorted(updated, reverse=True)


async def test_list_skips_chats_whose_messages_are_missing(http, server, admin, app_name):
    kept = await create(http, make_chat(app=app_name))
    lost = await create(http, make_chat(app=app_name))
    server.backend.remove_blob(server.blob_key_of(lost))
    status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    assert status == 200
    assert [chat["chatId"] for chat in chats] == [kept]


async def test_list_of_unknown_app_is_empty(http, admin):
    assert await call(http, "GET", f"/api/chats?app={unique_id()}", headers=admin) == (200, [])


async def test_delete_without_the_admin_key_is_401_and_keeps_the_chat(http, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    assert await call(http, "DELETE", f"/api/chats/{chat_id}") == (401, {"error": "Unauthorized"})
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200


async def test_delete_removes_row_and_blob(http, server, admin, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    key = server.blob_key_of(chat_id)
    assert await call(http, "DELETE", f"/api/chats/{chat_id}", headers=admin) == (
        200,
        {"success": True},
    )
    assert await call(http, "GET", f"/api/chats/{chat_id}") == (404, {"error": "Chat not found"})
    assert server.backend.read_blob(key) is None
    assert (await call(http, "GET", f"/api/chats?app={app_name}", headers=admin))[1] == []


async def test_delete_of_unknown_chat_succeeds(http, admin):
    assert await call(http, "DELETE", f"/api/chats/{unique_id()}", headers=admin) == (
        200,
        {"success": True},
    )


async def test_delete_with_invalid_id_is_404(http, admin):
    assert await call(http, "DELETE", "/api/chats/a.b", headers=admin) == (
        404,
        {"error": "Chat not found"},
    )


async def test_a_deleted_id_can_be_created_again(http, admin, app_name):
    chat_id = await create(http, make_chat(unique_id(), app=app_name))
    await call(http, "DELETE", f"/api/chats/{chat_id}", headers=admin)
    assert await create(http, make_chat(chat_id, app=app_name, messages=["new"])) == chat_id


async def test_without_a_configured_admin_key_every_admin_request_is_401(start_server):
    server = await start_server(ADMIN_KEY="")
    async with aiohttp.ClientSession(server.url) as http:
        for headers in ({}, {"x-admin-key": ""}, {"x-admin-key": "anything"}):
            assert await call(http, "GET", "/api/chats?app=a", headers=headers) == (
                401,
                {"error": "Unauthorized"},
            )
            assert await call(http, "DELETE", "/api/chats/abc", headers=headers) == (
                401,
                {"error": "Unauthorized"},
            )


async def test_a_list_left_early_closes_every_chat_it_opened_ahead(start_server, backend_name):
    if backend_name != "file":
        pytest.skip("counts the open files of the file store")
    server = await start_server()
    app = "left-early"
    for n in range(20):  # each over 256 KiB: listed from an open blob, not from memory
        body = big_chat(f"leftEarly{n:02d}", app, 0.3)
        async with server.client.post("/api/chats", data=body) as response:
            assert response.status == 200

    def open_files() -> int:
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if "blobs" in _target(fd))

    before = open_files()
    response = await server.client.get(f"/api/chats?app={app}", headers={"x-admin-key": ADMIN_KEY})
    assert response.status == 200
    await response.content.readany()
    assert open_files() > before  # chats opened ahead of the one being sent
    response.close()
    for _ in range(50):
        if open_files() == before:
            break
        await asyncio.sleep(0.05)
    assert open_files() == before


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


async def test_a_list_of_small_and_large_chats_gives_each_as_its_get(start_server):
    """More chats than are read ahead at once, small ones (read whole) between large ones
    (streamed from their blob): each comes whole, in order, as its own GET gives it."""
    server = await start_server()
    app = "mixed-sizes"
    ids = []
    for n in range(40):
        chat_id = f"mixedSizes{n:02d}"
        if n % 10 == 3:
            body = big_chat(chat_id, app, 0.3)
        else:
            body = orjson.dumps({"chat": make_chat(chat_id, app, messages=[f"m{n}"] * n)})
        async with server.client.post("/api/chats", data=body) as response:
            assert response.status == 200
        ids.append(chat_id)
    status, chats = await call(
        server.client, "GET", f"/api/chats?app={app}", headers={"x-admin-key": ADMIN_KEY}
    )
    assert status == 200
    assert sorted(chat["chatId"] for chat in chats) == ids
    updated = [chat["updatedAt"] for chat in chats]
    assert updated == sorted(updated, reverse=True)
    for chat in chats:
        assert await call(server.client, "GET", f"/api/chats/{chat['chatId']}") == (200, chat)
