"""POST /api/chats against the real server, on the file store and on S3."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from tests.helpers import (
    ISO_MS,
    KILOBYTE_OF_MESSAGES,
    STORAGE_FULL,
    body_of_size,
    call,
    create,
    make_chat,
    storage_cap,
    unique_id,
)

MIB = 1024 * 1024

pytestmark = [pytest.mark.on_both_backends, pytest.mark.on_both_databases]


async def test_create_without_id_generates_21_alphanumerics(http, app_name):
    status, body = await call(http, "POST", "/api/chats", json={"chat": make_chat(app=app_name)})
    assert status == 200
    assert list(body) == ["chatId"]
    assert re.fullmatch(r"[A-Za-z0-9]{21}", body["chatId"])


@pytest.mark.parametrize("given", ["", None])
async def test_create_with_empty_or_null_id_generates_one(http, app_name, given):
    chat = make_chat(app=app_name)
    chat["chatId"] = given
    status, body = await call(http, "POST", "/api/chats", json={"chat": chat})
    assert status == 200
    assert re.fullmatch(r"[A-Za-z0-9]{21}", body["chatId"])


async def test_generated_ids_differ(http, app_name):
    ids = {await create(http, make_chat(app=app_name)) for _ in range(20)}
    assert len(ids) == 20


async def test_create_keeps_a_given_id(http, app_name):
    chat_id = f"my_chat-{unique_id()}"
    assert await create(http, make_chat(chat_id, app=app_name)) == chat_id


async def test_created_chat_reads_back_in_contract_shape(http, app_name):
    chat_id = unique_id()
    sent = make_chat(chat_id, app=app_name, usage=(12, 40, 0.0001))
    await create(http, sent)
    status, body = await call(http, "GET", f"/api/chats/{chat_id}")
    assert status == 200
    assert list(body) == [
        "chatId",
        "app",
        "model",
        "messages",
        "totalUsage",
        "createdAt",
        "updatedAt",
    ]
    assert body["chatId"] == chat_id
    assert body["app"] == app_name
    assert body["model"] == sent["model"]
    assert body["messages"] == sent["messages"]
    assert body["totalUsage"] == {
        "promptTokens": 12,
        "completionTokens": 40,
        "estimatedCost": 0.0001,
    }
    assert ISO_MS.fullmatch(body["createdAt"])
    assert body["updatedAt"] == body["createdAt"]


async def test_timestamps_come_from_the_server_not_the_client(http, app_name):
    chat_id = unique_id()
    chat = make_chat(chat_id, app=app_name)
    chat["createdAt"] = chat["updatedAt"] = "1999-01-01T00:00:00.000Z"
    await create(http, chat)
    _, body = await call(http, "GET", f"/api/chats/{chat_id}")
    assert body["createdAt"].startswith("20") and not body["createdAt"].startswith("1999")
    assert body["updatedAt"] == body["createdAt"]


async def test_integral_usage_numbers_render_like_javascript(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, usage=(3, 4.5, 0)))
    async with http.get(f"/api/chats/{chat_id}") as response:
        raw = await response.read()
    assert b'"totalUsage":{"promptTokens":3,"completionTokens":4.5,"estimatedCost":0}' in raw


MESSAGES_OF_EVERY_KIND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "ünïcödé ✓ \"quotes\" and 'apostrophes' 😀 \u2028"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": '{"q": "nwb"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "[1, 2.5, -3e-7, true, null]"},
    {"role": "assistant", "content": "ok", "feedback": {"rating": -1, "note": ""}, "n": 1.5},
    "a bare string",
    42,
    [],
]


async def test_messages_are_stored_and_served_as_sent(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, messages=MESSAGES_OF_EVERY_KIND))
    _, body = await call(http, "GET", f"/api/chats/{chat_id}")
    assert body["messages"] == MESSAGES_OF_EVERY_KIND


async def test_blob_is_the_messages_array_alone_under_the_key_its_row_names(http, server, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, messages=MESSAGES_OF_EVERY_KIND))
    stored = server.backend.read_blob(server.blob_key_of(chat_id))
    assert orjson.loads(stored) == MESSAGES_OF_EVERY_KIND


async def test_duplicate_create_is_409_and_leaves_the_stored_chat_alone(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, model="first", messages=["original"]))
    status, body = await call(
        http,
        "POST",
        "/api/chats",
        json={"chat": make_chat(chat_id, app=app_name, model="second", messages=["overwrite"])},
    )
    assert (status, body) == (409, {"error": "Chat already exists"})
    _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
    assert stored["model"] == "first"
    assert stored["messages"] == ["original"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"chat": {"app": "a"'])
async def test_malformed_json_is_400(http, body):
    status, answer = await call(
        http, "POST", "/api/chats", data=body, headers={"Content-Type": "application/json"}
    )
    assert (status, answer) == (400, {"error": "Invalid JSON body"})


def _without(key: str) -> dict:
    chat = make_chat(unique_id())
    del chat[key]
    return {"chat": chat}


def _with(**changes) -> dict:
    chat = make_chat(unique_id())
    chat.update(changes)
    return {"chat": chat}


def _usage(**changes) -> dict:
    chat = make_chat(unique_id())
    chat["totalUsage"].update(changes)
    return {"chat": chat}


def nested(depth: int) -> list:
    """A list `depth` levels deep: orjson reads 1,024 levels but writes only 254."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


INVALID_CHATS = {
    "no chat": {},
    "chat is a string": {"chat": "x"},
    "chat is null": {"chat": None},
    "body is an array": [make_chat()],
    "body is a number": 3,
    "no app": _without("app"),
    "no model": _without("model"),
    "no messages": _without("messages"),
    "no usage": _without("totalUsage"),
    "app is a number": _with(app=3),
    "model is null": _with(model=None),
    "chat id is a number": _with(chatId=7),
    "messages is an object": _with(messages={"role": "user"}),
    "usage is an array": _with(totalUsage=[1, 2, 3]),
    "prompt tokens missing": {"chat": {**make_chat(), "totalUsage": {"completionTokens": 1}}},
    "prompt tokens a string": _usage(promptTokens="12"),
    "completion tokens a boolean": _usage(completionTokens=True),
    "cost null": _usage(estimatedCost=None),
    # Valid JSON the server could not store or write again: never a 500.
    "prompt tokens beyond 64 bits": _usage(promptTokens=2**63),
    "completion tokens beyond 64 bits": _usage(completionTokens=2**64 - 1),
    "messages nested 300 deep": _with(messages=nested(300)),
    "an extra field nested 300 deep": _with(extra=nested(300)),
}


@pytest.mark.parametrize("body", INVALID_CHATS.values(), ids=INVALID_CHATS.keys())
async def test_invalid_chat_data_is_400(http, body):
    status, answer = await call(http, "POST", "/api/chats", json=body)
    assert (status, answer) == (400, {"error": "Invalid chat data"})


@pytest.mark.parametrize(
    "chat_id", ["../escape", "a/b", "a.b", "a b", "x" * 129, "é", "chat\x00", ".."]
)
async def test_invalid_chat_id_is_400(http, server, chat_id):
    status, answer = await call(http, "POST", "/api/chats", json={"chat": make_chat(chat_id)})
    assert (status, answer) == (400, {"error": "Invalid chat id"})
    if server.backend.name == "file":
        assert [p.name for p in server.data_dir.rglob("*escape*")] == []


async def test_longest_valid_chat_id_is_accepted(http, app_name):
    chat_id = "A-_z9" * 25 + "abc"
    assert len(chat_id) == 128
    assert await create(http, make_chat(chat_id, app=app_name)) == chat_id


async def test_body_of_exactly_10_mib_is_accepted(http, app_name):
    body = body_of_size(10 * MIB, app_name)
    assert len(body) == 10 * MIB
    status, answer = await call(
        http, "POST", "/api/chats", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 200, answer
    status, chat = await call(http, "GET", f"/api/chats/{answer['chatId']}")
    assert status == 200
    assert chat["messages"] == orjson.loads(body)["chat"]["messages"]


async def test_body_one_byte_over_10_mib_is_413(http, app_name):
    body = body_of_size(10 * MIB + 1, app_name)
    status, answer = await call(
        http, "POST", "/api/chats", data=body, headers={"Content-Type": "application/json"}
    )
    assert (status, answer) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Request body too large: 10.0 MB (max: 10.0 MB)",
        },
    )


async def test_body_of_12_mib_is_413_naming_its_size(http, app_name):
    status, answer = await call(
        http,
        "POST",
        "/api/chats",
        data=body_of_size(12 * MIB, app_name),
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    assert answer == {
        "error": "Request validation failed",
        "message": "Request body too large: 12.0 MB (max: 10.0 MB)",
    }


async def test_oversized_chunked_body_is_413(http, app_name):
    body = body_of_size(11 * MIB, app_name)

    async def chunks():
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    status, answer = await call(http, "POST", "/api/chats", data=chunks())
    assert status == 413
    assert answer["error"] == "Request validation failed"
    assert answer["message"].startswith("Request body too large: ")


async def test_oversized_create_stores_nothing(http, admin, app_name):
    await call(
        http,
        "POST",
        "/api/chats",
        data=body_of_size(10 * MIB + 100, app_name),
        headers={"Content-Type": "application/json"},
    )
    status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
    assert (status, chats) == (200, [])


async def test_chat_limit_per_app_is_400_with_contract_message(start_server, app_name):
    server = await start_server(QP_MAX_CHATS_PER_APP="3")
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(3):
            await create(http, make_chat(app=app_name))
        status, answer = await call(
            http, "POST", "/api/chats", json={"chat": make_chat(app=app_name)}
        )
        assert (status, answer) == (
            400,
            {"error": f"Chat limit exceeded for app {app_name}. Maximum 3 chats allowed."},
        )
        # Another app is not affected.
        await create(http, make_chat(app=f"{app_name}-other"))


async def test_chat_limit_holds_under_concurrent_creates(start_server, app_name, admin):
    server = await start_server(QP_MAX_CHATS_PER_APP="5")
    async with aiohttp.ClientSession(server.url) as http:
        results = await asyncio.gather(
            *(
                call(http, "POST", "/api/chats", json={"chat": make_chat(app=app_name)})
                for _ in range(40)
            )
        )
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * 5 + [400] * 35
        status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
        assert status == 200
        assert len(chats) == 5


async def test_the_total_storage_cap_holds_under_concurrent_creates(start_server, app_name, admin):
    server = await start_server(QP_MAX_TOTAL_STORAGE_GB=storage_cap(4500))
    chat = {"chat": make_chat(app=app_name, messages=KILOBYTE_OF_MESSAGES)}
    async with aiohttp.ClientSession(server.url) as http:
        results = await asyncio.gather(
            *(call(http, "POST", "/api/chats", json=chat) for _ in range(40))
        )
        assert sorted(status for status, _ in results) == [200] * 4 + [507] * 36
        assert [result for result in results if result[0] == 507] == [STORAGE_FULL] * 36
        status, chats = await call(http, "GET", f"/api/chats?app={app_name}", headers=admin)
        assert (status, len(chats)) == (200, 4)
    assert server.database.rows("SELECT SUM(messages_bytes) AS total FROM chats") == [
        {"total": 4000}
    ]
    # No intent left: a write refused at its commit (its blob put) made its blob garbage.
    assert server.database.rows("SELECT rev FROM chat_writes") == []


async def test_an_update_gets_507_only_when_it_would_grow_the_total_past_the_cap(
    start_server, app_name
):
    server = await start_server(QP_MAX_TOTAL_STORAGE_GB=storage_cap(3500))
    async with aiohttp.ClientSession(server.url) as http:
        chat_ids = [
            await create(http, make_chat(app=app_name, messages=KILOBYTE_OF_MESSAGES))
            for _ in range(3)
        ]
        # 300 bytes more each: room for one of them.
        grown = ["x" * 1296]
        results = await asyncio.gather(
            *(
                call(
                    http,
                    "PUT",
                    f"/api/chats/{chat_id}",
                    json={"chat": make_chat(chat_id, app=app_name, messages=grown)},
                )
                for chat_id in chat_ids
            )
        )
        assert (
            sorted(results, key=lambda result: result[0])
            == [(200, {"success": True})] + [STORAGE_FULL] * 2
        )
        # At the cap, an update that keeps or shrinks its chat is still stored.
        for chat_id in chat_ids:
            same = make_chat(chat_id, app=app_name, model="kept", messages=KILOBYTE_OF_MESSAGES)
            assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": same}) == (
                200,
                {"success": True},
            )
    assert server.database.rows("SELECT SUM(messages_bytes) AS total FROM chats") == [
        {"total": 3000}
    ]
