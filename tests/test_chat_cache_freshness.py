"""The in-memory chat cache never serves a chat older than what is stored."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest

from tests.helpers import call, create, make_chat

pytestmark = pytest.mark.on_both_backends


async def test_get_after_put_serves_the_new_chat(http, app_name):
    chat_id = uuid.uuid4().hex
    await create(http, make_chat(chat_id, app=app_name, messages=["v1"]))
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["messages"] == ["v1"]
    update = make_chat(chat_id, app=app_name, messages=["v2"])
    await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update})
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["messages"] == ["v2"]


async def test_get_after_delete_is_404(http, admin, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 200
    await call(http, "DELETE", f"/api/chats/{chat_id}", headers=admin)
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[0] == 404


async def test_list_after_put_serves_the_new_chat(http, admin, app_name):
    chat_id = await create(http, make_chat(app=app_name, messages=["v1"]))
    await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    update = make_chat(chat_id, app=app_name, messages=["v2"])
    await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update})
    _, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    assert [chat["messages"] for chat in chats] == [["v2"]]


async def test_a_change_made_by_another_process_is_seen_within_two_seconds(http, server, app_name):
    chat_id = await create(http, make_chat(app=app_name, model="before"))
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "before"
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        db.execute("UPDATE chats SET model = 'after' WHERE chat_id = ?", (chat_id,))
    for _ in range(40):
        await asyncio.sleep(0.05)
        if (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "after":
            break
    else:
        raise AssertionError("the server kept serving the chat as it was before the change")
