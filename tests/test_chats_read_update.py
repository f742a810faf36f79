"""GET and PUT /api/chats/{chatId} against the real server, on the file store and on S3."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.helpers import ISO_MS, big_chat, body_of_size, call, create, make_chat, unique_id

pytestmark = [pytest.mark.on_both_backends, pytest.mark.on_both_databases]


async def test_get_unknown_chat_is_404(http):
    assert await call(http, "GET", f"/api/chats/{unique_id()}") == (
        404,
        {"error": "Chat not found"},
    )


@pytest.mark.parametrize("path_id", ["a.b", "..%2Fescape", "x" * 129, "%C3%A9", "a%20b"])
async def test_get_with_invalid_id_is_404(http, path_id):
    assert await call(http, "GET", f"/api/chats/{path_id}") == (404, {"error": "Chat not found"})


async def test_get_of_a_row_whose_blob_is_missing_is_404(http, server, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name))
    server.backend.remove_blob(server.blob_key_of(chat_id))
    assert await call(http, "GET", f"/api/chats/{chat_id}") == (404, {"error": "Chat not found"})


async def test_put_replaces_messages_model_usage_and_updated_at(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, model="m1", messages=["one"]))
    _, before = await call(http, "GET", f"/api/chats/{chat_id}")
    await asyncio.sleep(0.01)
    update = make_chat(
        chat_id, app=app_name, model="m2", messages=["one", "two"], usage=(5, 6, 0.7)
    )
    status, body = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update})
    assert (status, body) == (200, {"success": True})
    _, after = await call(http, "GET", f"/api/chats/{chat_id}")
    assert after["model"] == "m2"
    assert after["messages"] == ["one", "two"]
    assert after["totalUsage"] == {"promptTokens": 5, "completionTokens": 6, "estimatedCost": 0.7}
    assert after["createdAt"] == before["createdAt"]
    assert ISO_MS.fullmatch(after["updatedAt"])
    assert after["updatedAt"] > before["updatedAt"]


async def test_put_never_changes_app_or_created_at(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name))
    _, before = await call(http, "GET", f"/api/chats/{chat_id}")
    update = make_chat(chat_id, app="another-app")
    update["createdAt"] = "1999-01-01T00:00:00.000Z"
    status, _ = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update})
    assert status == 200
    _, after = await call(http, "GET", f"/api/chats/{chat_id}")
    assert after["app"] == app_name
    assert after["createdAt"] == before["createdAt"]


async def test_put_of_unknown_chat_is_404_and_stores_nothing(http, server):
    chat_id = unique_id()
    status, body = await call(
        http, "PUT", f"/api/chats/{chat_id}", json={"chat": make_chat(chat_id)}
    )
    assert (status, body) == (404, {"error": "Chat not found"})
    assert server.backend.read_blob(f"chats/{chat_id}.json") is None
    assert await call(http, "GET", f"/api/chats/{chat_id}") == (404, {"error": "Chat not found"})


async def test_put_with_mismatched_id_is_400_and_changes_nothing(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, model="kept"))
    status, body = await call(
        http, "PUT", f"/api/chats/{chat_id}", json={"chat": make_chat(unique_id(), model="new")}
    )
    assert (status, body) == (400, {"error": "Chat ID mismatch"})
    _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
    assert stored["model"] == "kept"


async def test_put_without_chat_id_is_invalid_chat_data(http):
    chat_id = unique_id()
    status, body = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": make_chat()})
    assert (status, body) == (400, {"error": "Invalid chat data"})


@pytest.mark.parametrize("chat_id", ["a.b", "é", "x" * 129])
async def test_put_with_invalid_id_is_400(http, chat_id):
    status, body = await call(
        http, "PUT", f"/api/chats/{chat_id}", json={"chat": make_chat(chat_id)}
    )
    assert (status, body) == (400, {"error": "Invalid chat id"})


async def test_put_with_malformed_json_is_400_and_changes_nothing(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, messages=["kept"]))
    status, body = await call(
        http,
        "PUT",
        f"/api/chats/{chat_id}",
        data=b'{"chat": ',
        headers={"Content-Type": "application/json"},
    )
    assert (status, body) == (400, {"error": "Invalid JSON body"})
    _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
    assert stored["messages"] == ["kept"]


async def test_put_with_invalid_chat_is_400(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name))
    bad = make_chat(chat_id, app=app_name)
    bad["messages"] = "not an array"
    status, body = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": bad})
    assert (status, body) == (400, {"error": "Invalid chat data"})


async def test_put_over_10_mib_is_413_and_changes_nothing(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, messages=["kept"]))
    status, body = await call(
        http,
        "PUT",
        f"/api/chats/{chat_id}",
        data=body_of_size(12 * 1024 * 1024, app_name),
        headers={"Content-Type": "application/json"},
    )
    assert (status, body) == (
        413,
        {
            "error": "Request validation failed",
            "message": "Request body too large: 12.0 MB (max: 10.0 MB)",
        },
    )
    _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
    assert stored["messages"] == ["kept"]


async def test_concurrent_puts_leave_metadata_and_messages_from_one_request(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name))
    for round_ in range(8):
        # Big and small messages make the writes take different times, so they interleave.
        updates = [
            make_chat(
                chat_id,
                app=app_name,
                model=f"model-{i}",
                messages=[
                    {"writer": i, "text": "x" * (3_000_000 if (i + round_) % 4 == 0 else 10)}
                ],
                usage=(i, i, i / 100),
            )
            for i in range(16)
        ]
        results = await asyncio.gather(
            *(call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": u}) for u in updates)
        )
        assert all(result == (200, {"success": True}) for result in results)
        _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
        writer = stored["messages"][0]["writer"]
        assert stored["model"] == f"model-{writer}"
        assert stored["totalUsage"]["promptTokens"] == writer


async def test_reads_during_concurrent_puts_always_see_one_whole_write(http, app_name):
    chat_id = unique_id()
    await create(http, make_chat(chat_id, app=app_name, model="model-0", messages=[{"writer": 0}]))
    seen: list[dict] = []

    async def read_repeatedly():
        for _ in range(30):
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            assert status == 200
            seen.append(chat)

    async def write(i: int):
        update = make_chat(
            chat_id,
            app=app_name,
            model=f"model-{i}",
            messages=[{"writer": i, "text": "y" * (i % 3) * 300_000}],
        )
        assert (await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update}))[0] == 200

    await asyncio.gather(read_repeatedly(), read_repeatedly(), *(write(i) for i in range(1, 16)))
    for chat in seen:
        assert chat["model"] == f"model-{chat['messages'][0]['writer']}"


@pytest.mark.parametrize(
    "usage",
    [{"promptTokens": 2**63}, {"completionTokens": 2**64 - 1}],
    ids=["2^63", "2^64-1"],
)
async def test_usage_beyond_64_bits_on_update_is_400_and_keeps_the_chat(http, app_name, usage):
    chat_id = await create(http, make_chat(app=app_name))
    _, before = await call(http, "GET", f"/api/chats/{chat_id}")
    update = make_chat(chat_id, app=app_name)
    update["totalUsage"].update(usage)
    assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update}) == (
        400,
        {"error": "Invalid chat data"},
    )
    assert await call(http, "GET", f"/api/chats/{chat_id}") == (200, before)


async def test_messages_too_deep_to_write_again_on_update_are_400(http, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    deep: list = []
    for _ in range(299):
        deep = [deep]
    update = make_chat(chat_id, app=app_name, messages=deep)
    assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": update}) == (
        400,
        {"error": "Invalid chat data"},
    )


async def test_get_answers_the_revision_as_etag_and_304_to_a_client_that_has_it(
    http, server, app_name
):
    chat_id = await create(http, make_chat(app=app_name, messages=["one"]))
    rev = server.blob_key_of(chat_id).rsplit("/", 1)[1].removesuffix(".json")
    async with http.get(f"/api/chats/{chat_id}") as response:
        assert response.status == 200
        assert response.headers["ETag"] == f'"{rev}"'
        assert (await response.json())["messages"] == ["one"]
    for header in (f'"{rev}"', f'W/"{rev}"', f'"other", "{rev}"'):
        async with http.get(f"/api/chats/{chat_id}", headers={"If-None-Match": header}) as got:
            assert got.status == 304, header
            assert got.headers["ETag"] == f'"{rev}"'
            assert await got.read() == b""
    async with http.get(f"/api/chats/{chat_id}", headers={"If-None-Match": '"old"'}) as stale:
        assert stale.status == 200
        assert (await stale.json())["messages"] == ["one"]


async def test_a_large_chat_streamed_carries_its_etag_too(http, server, app_name):
    status, created = await call(
        http, "POST", "/api/chats", data=big_chat(unique_id(), app_name, 2)
    )
    assert status == 200
    chat_id = created["chatId"]
    rev = server.blob_key_of(chat_id).rsplit("/", 1)[1].removesuffix(".json")
    async with http.get(f"/api/chats/{chat_id}") as response:
        assert response.status == 200
        assert response.headers["ETag"] == f'"{rev}"'
        assert len(await response.read()) > 1024 * 1024


async def test_put_answers_the_new_etag_which_get_then_gives(http, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    async with http.get(f"/api/chats/{chat_id}") as response:
        first = response.headers["ETag"]
    async with http.put(
        f"/api/chats/{chat_id}", json={"chat": make_chat(chat_id, app=app_name, model="m2")}
    ) as response:
        assert (response.status, await response.json()) == (200, {"success": True})
        second = response.headers["ETag"]
    assert second != first
    async with http.get(f"/api/chats/{chat_id}") as response:
        assert response.headers["ETag"] == second


async def test_put_if_match_the_current_revision_stores_the_chat(http, app_name):
    chat_id = await create(http, make_chat(app=app_name))
    async with http.get(f"/api/chats/{chat_id}") as response:
        etag = response.headers["ETag"]
    for if_match in (etag, "*"):
        chat = make_chat(chat_id, app=app_name, model=f"after {if_match}")
        status, body = await call(
            http,
            "PUT",
            f"/api/chats/{chat_id}",
            json={"chat": chat},
            headers={"If-Match": if_match},
        )
        assert (status, body) == (200, {"success": True})
        assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["model"] == f"after {if_match}"
        async with http.get(f"/api/chats/{chat_id}") as response:
            etag = response.headers["ETag"]


async def test_put_if_match_a_stale_revision_is_412_and_stores_nothing(http, server, app_name):
    chat_id = await create(http, make_chat(app=app_name, model="m1", messages=["one"]))
    async with http.get(f"/api/chats/{chat_id}") as response:
        stale = response.headers["ETag"]
    chat = make_chat(chat_id, app=app_name, model="m2", messages=["two"])
    assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}) == (
        200,
        {"success": True},
    )
    key = server.blob_key_of(chat_id)
    late = make_chat(chat_id, app=app_name, model="m3", messages=["three"])
    status, body = await call(
        http, "PUT", f"/api/chats/{chat_id}", json={"chat": late}, headers={"If-Match": stale}
    )
    assert (status, body) == (412, {"error": "Chat changed"})
    _, stored = await call(http, "GET", f"/api/chats/{chat_id}")
    assert (stored["model"], stored["messages"]) == ("m2", ["two"])
    assert server.blob_key_of(chat_id) == key


async def test_put_if_match_of_an_unknown_chat_is_404(http):
    chat_id = unique_id()
    status, body = await call(
        http,
        "PUT",
        f"/api/chats/{chat_id}",
        json={"chat": make_chat(chat_id)},
        headers={"If-Match": '"anything"'},
    )
    assert (status, body) == (404, {"error": "Chat not found"})


async def test_if_none_match_star_is_304_and_a_weak_if_match_never_matches(http, app_name):
    chat_id = await create(http, make_chat(app=app_name, model="m1"))
    async with http.get(f"/api/chats/{chat_id}") as response:
        etag = response.headers["ETag"]
    async with http.get(f"/api/chats/{chat_id}", headers={"If-None-Match": "*"}) as got:
        assert (got.status, got.headers["ETag"]) == (304, etag)
    chat = make_chat(chat_id, app=app_name, model="m2")
    status, body = await call(
        http, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}, headers={"If-Match": f"W/{etag}"}
    )
    assert (status, body) == (412, {"error": "Chat changed"})
    assert (await call(http, "GET", f"/api/chats/{chat_id}"))[1]["model"] == "m1"


async def test_the_blob_an_update_supersedes_is_deleted_a_moment_later(http, server, app_name):
    chat_id = await create(http, make_chat(app=app_name, messages=["one"]))
    old_key = server.blob_key_of(chat_id)
    chat = make_chat(chat_id, app=app_name, messages=["two"])
    assert (await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": chat}))[0] == 200
    new_key = server.blob_key_of(chat_id)
    assert new_key != old_key

    def garbage() -> list:
        return server.database.rows("SELECT * FROM chat_garbage WHERE chat_id = ?", (chat_id,))

    deadline = asyncio.get_running_loop().time() + 10
    while server.backend.read_blob(old_key) is not None or garbage():
        assert asyncio.get_running_loop().time() < deadline, "the superseded blob stayed"
        await asyncio.sleep(0.05)
    assert orjson.loads(server.backend.read_blob(new_key)) == ["two"]
