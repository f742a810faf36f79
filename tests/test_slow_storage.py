"""A slow or late blob store never tears a chat, nor starves other clients' writes.

Real `server.py` processes on S3 (SeaweedFS behind SlowS3, a proxy that delays its
answers), on SQLite and on PostgreSQL; and on file blobs, clients that leave mid-PUT.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.app_server import Database
from tests.helpers import call, chat_version, create, make_chat, unique_id
from tests.processes import QPServer, SeaweedFS
from tests.slow_s3 import SlowS3

STORAGE_UNAVAILABLE = (503, {"error": "Storage unavailable"})
SUCCESS = (200, {"success": True})
JSON = {"Content-Type": "application/json"}


@dataclass
class Served:
    """A server process on S3 through the proxy: where its rows and its blobs are."""

    qp: QPServer
    db: Database
    seaweed: SeaweedFS
    bucket: str
    prefix: str

    def __post_init__(self) -> None:
        # Made once: making a botocore client takes seconds beside CPU burners, longer
        # than the write's bound.
        self.s3 = self.seaweed.client()

    def stored(self, chat_id: str) -> set[str]:
        """The chat's blobs in the bucket, as keys under `chats/`: `{id}/{rev}.json` (and
        `{id}.json`, the worker's key, were there one)."""
        where = f"{self.prefix}chats/"
        found = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=where + chat_id)
        return {item["Key"][len(where) :] for item in found.get("Contents", [])}

    def rev_of(self, chat_id: str) -> str:
        (row,) = self.db.rows("SELECT blob_rev FROM chats WHERE chat_id = ?", (chat_id,))
        return row["blob_rev"]

    def unfinished(self, chat_id: str) -> list[dict[str, Any]]:
        """The chat's write intents and garbage the tables still hold."""
        return self.db.rows(
            "SELECT rev FROM chat_writes WHERE chat_id = ?"
            " UNION ALL SELECT rev FROM chat_garbage WHERE chat_id = ?",
            (chat_id, chat_id),
        )


def serve_on_slow_s3(
    qp_server: Callable[..., QPServer],
    seaweed: SeaweedFS,
    bucket: str,
    proxy: SlowS3,
    postgres_url: str | None,
    **env: str,
) -> Served:
    prefix = f"slow-{uuid.uuid4().hex[:12]}/"
    s3 = {**seaweed.server_env(bucket, prefix), "QP_S3_ENDPOINT_URL": proxy.endpoint_url}
    database = {"QP_DATABASE": postgres_url} if postgres_url else {}
    qp = qp_server(**s3, **database, **env)
    return Served(qp, Database(qp.data_dir, postgres_url), seaweed, bucket, prefix)


def postgres_url_for(database_name: str, request: pytest.FixtureRequest) -> str | None:
    if database_name != "postgres":
        return None
    return request.getfixturevalue("postgres").create_database()


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Until `condition()` holds, `seconds` at most."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not so after {seconds} s"
        await asyncio.sleep(0.05)


async def read_whole(http: aiohttp.ClientSession, chat: dict) -> None:
    """GET answers `chat` whole: its model, usage and messages all of one write."""
    status, got = await call(http, "GET", f"/api/chats/{chat['chatId']}")
    assert status == 200, got
    assert (got["model"], got["totalUsage"], got["messages"]) == (
        chat["model"],
        chat["totalUsage"],
        chat["messages"],
    )


# --- S3 that lands late ----------------------------------------------------------------------

# Long enough for a SeaweedFS beside CPU burners; the write bound is its minimum, twice it.
S3_TIMEOUT = 2.0


@pytest.mark.on_both_databases
async def test_a_put_that_lands_after_its_timeout_leaves_the_chat_wholly_old(
    database_name, request, qp_server, seaweed, shared_bucket, slow_s3
):
    server = serve_on_slow_s3(
        qp_server,
        seaweed,
        shared_bucket,
        slow_s3,
        postgres_url_for(database_name, request),
        QP_S3_TIMEOUT=f"{S3_TIMEOUT:g}",
        QP_WRITE_ABANDON_SECONDS=f"{2 * S3_TIMEOUT:g}",
    )
    chat_id = unique_id()
    v1, v2 = chat_version(chat_id, 1), chat_version(chat_id, 2)
    async with aiohttp.ClientSession(server.qp.url) as http:
        await create(http, v1)
        first = server.rev_of(chat_id)

        # SeaweedFS stores the put at once; its answer is held past the timeout.
        slow_s3.reset()
        answer_late = slow_s3.hold("PUT")
        started = time.monotonic()
        put = await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": v2})
        assert put == STORAGE_UNAVAILABLE
        await read_whole(http, v1)
        puts = slow_s3.rule("PUT")
        assert puts.statuses == [200] and puts.answered == [], "the put did not land unanswered"
        late = server.stored(chat_id) - {f"{chat_id}/{first}.json"}
        # (Housekeeping deletes it from the write's bound on: say when it was looked for.)
        seen_after = time.monotonic() - started
        assert len(late) == 1, (server.stored(chat_id), f"{seen_after:.1f} s after the put")
        assert server.rev_of(chat_id) == first

        # Its answer comes, too late: nothing changes.
        answer_late.set()
        await wait_until(
            lambda: len(puts.answered) == len(puts.arrived), 10, "the late put answered"
        )
        assert server.rev_of(chat_id) == first
        await read_whole(http, v1)

        # Past the write's bound, housekeeping gives it up and deletes its blob.
        await wait_until(
            lambda: (
                server.stored(chat_id) == {f"{chat_id}/{first}.json"}
                and server.unfinished(chat_id) == []
            ),
            15,
            "the late blob collected",
        )
        assert server.rev_of(chat_id) == first
        await read_whole(http, v1)

        slow_s3.reset()
        assert await call(http, "PUT", f"/api/chats/{chat_id}", json={"chat": v2}) == SUCCESS
        await read_whole(http, v2)
        second = server.rev_of(chat_id)
        assert second != first
        await wait_until(
            lambda: (
                server.stored(chat_id) == {f"{chat_id}/{second}.json"}
                and server.unfinished(chat_id) == []
            ),
            10,
            "the superseded blob collected",
        )
        await read_whole(http, v2)


# --- Slow blob store on PostgreSQL -----------------------------------------------------------

LEASE_SECONDS = 3.0
# Every S3 put and get waits this long before it is passed on: longer than the lease.
SLOW = 4.0
# What "about the delay" may add, beside two CPU burners on a small machine.
SLACK = 4.0
CLIENTS = 24


class LeaseWatch:
    """Samples the server's process lease in PostgreSQL (10 times a second) while in use:
    `lapses` are the moments no live lease was there."""

    def __init__(self, url: str):
        self.url = url
        self.samples = 0
        self.lapses: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseWatch:
        self._conn = await asyncpg.connect(self.url)
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._conn.close()

    async def _watch(self) -> None:
        started = time.monotonic()
        while True:
            live = await self._conn.fetchval(
                "SELECT COUNT(*) FROM write_leases"
                " WHERE expires_at > extract(epoch FROM clock_timestamp())"
            )
            self.samples += 1
            if live != 1:
                self.lapses.append(time.monotonic() - started)
            await asyncio.sleep(0.1)


async def timed(request: Awaitable[tuple[int, Any]]) -> tuple[tuple[int, Any], float]:
    started = time.monotonic()
    answer = await request
    return answer, time.monotonic() - started


async def test_slow_s3_on_postgres_neither_fails_writes_nor_lets_the_lease_lapse(
    request, qp_server, seaweed, shared_bucket, slow_s3
):
    url = request.getfixturevalue("postgres").create_database()
    server = serve_on_slow_s3(
        qp_server,
        seaweed,
        shared_bucket,
        slow_s3,
        url,
        QP_WRITE_LEASE_SECONDS=f"{LEASE_SECONDS:g}",
        QP_S3_TIMEOUT="20",
        QP_CACHE_MB="0",  # every GET of the big chat downloads it
    )
    chats = [chat_version(unique_id(), 1) for _ in range(CLIENTS)]
    big_id = unique_id()
    big = make_chat(
        big_id, model="big", messages=[{"role": "user", "content": "x" * 300_000}], usage=(3, 3, 0)
    )
    clients = [aiohttp.ClientSession(server.qp.url) for _ in range(2 * CLIENTS)]
    try:
        http = clients[0]
        for chat in [*chats, big]:
            await create(http, chat)

        slow_s3.delay("PUT", before=SLOW)
        slow_s3.delay("GET", before=SLOW)
        async with LeaseWatch(url) as lease:
            # 24 clients update 24 chats at once: each answers 200 in about the delay.
            updates = [chat_version(chat["chatId"], 2) for chat in chats]
            answers = await asyncio.gather(
                *(
                    timed(call(client, "PUT", f"/api/chats/{u['chatId']}", json={"chat": u}))
                    for client, u in zip(clients, updates, strict=False)
                )
            )
            assert [answer for answer, _ in answers] == [SUCCESS] * CLIENTS
            took = sorted(elapsed for _, elapsed in answers)
            assert took[0] >= SLOW and took[-1] < SLOW + SLACK, took

            # 24 clients download the big chat, slowly; meanwhile other clients' small
            # updates of other chats answer 200.
            gets = [
                asyncio.create_task(call(client, "GET", f"/api/chats/{big_id}"))
                for client in clients[CLIENTS:]
            ]
            downloads = slow_s3.rule("GET")
            await wait_until(
                lambda: len(downloads.arrived) >= CLIENTS, 10, "24 downloads in flight"
            )
            assert downloads.answered == [], "the downloads were not all in flight at once"
            small = [chat_version(chat["chatId"], 3) for chat in chats[:8]]
            answers = await asyncio.gather(
                *(
                    timed(call(client, "PUT", f"/api/chats/{s['chatId']}", json={"chat": s}))
                    for client, s in zip(clients, small, strict=False)
                )
            )
            assert [answer for answer, _ in answers] == [SUCCESS] * len(small)
            assert max(elapsed for _, elapsed in answers) < SLOW + SLACK, answers
            downloaded = await asyncio.gather(*gets)
            assert [status for status, _ in downloaded] == [200] * CLIENTS
            for _, got in downloaded:
                assert (got["model"], got["messages"]) == (big["model"], big["messages"])
        assert lease.samples > 40 and lease.lapses == [], lease.lapses
        assert "cannot renew the process lease" not in server.qp.log()

        slow_s3.reset()
        for chat in [*small, *updates[len(small) :], big]:
            await read_whole(http, chat)
    finally:
        for client in clients:
            await client.close()


# --- Clients that leave mid-PUT ------------------------------------------------------------

# Messages big enough that a PUT takes a while to send, parse and store.
MESSAGE_BYTES = 2 * 1024 * 1024
LEAVINGS = 12


def versioned(chat_id: str, n: int) -> dict:
    """Version n of a chat whose messages are big: all its parts say n."""
    return make_chat(
        chat_id,
        model=f"v{n}",
        messages=[{"role": "user", "content": f"version {n} " + "x" * MESSAGE_BYTES}],
        usage=(n, n, n / 1000),
    )


async def test_clients_that_leave_mid_put_leave_each_chat_whole(qp_server):
    qp = qp_server()
    db = Database(qp.data_dir, None)
    chat_id = unique_id()
    written = {0: versioned(chat_id, 0)}
    blobs = qp.data_dir / "blobs" / "chats" / chat_id

    def stored() -> set[str]:
        return {path.name for path in blobs.iterdir()} if blobs.exists() else set()

    def settled() -> bool:
        (row,) = db.rows("SELECT blob_rev FROM chats WHERE chat_id = ?", (chat_id,))
        writes = db.rows("SELECT rev FROM chat_writes UNION ALL SELECT rev FROM chat_garbage")
        return writes == [] and stored() == {f"{row['blob_rev']}.json"}

    async def reads_one_whole_version(http: aiohttp.ClientSession) -> None:
        status, got = await call(http, "GET", f"/api/chats/{chat_id}")
        assert status == 200, got
        n = int(got["model"][1:])
        assert n in written, got["model"]
        chat = written[n]
        assert (got["totalUsage"], got["messages"]) == (chat["totalUsage"], chat["messages"])

    async with aiohttp.ClientSession(qp.url) as http:
        await create(http, written[0])
        path = f"/api/chats/{chat_id}"
        written[1] = versioned(chat_id, 1)
        started = time.monotonic()
        assert await call(http, "PUT", path, json={"chat": written[1]}) == SUCCESS
        whole_put = time.monotonic() - started

        # Clients that give up half way through sending the body: nothing changes.
        for n in (2, 3):
            written[n] = versioned(chat_id, n)
            body = orjson.dumps({"chat": written[n]})
            half_sent = asyncio.Event()

            async def half(body: bytes = body, half_sent: asyncio.Event = half_sent):
                yield body[: len(body) // 2]
                half_sent.set()
                await asyncio.Event().wait()  # the rest never comes

            async with aiohttp.ClientSession(qp.url) as leaving:
                sending = asyncio.create_task(leaving.put(path, data=half(), headers=JSON))
                await asyncio.wait_for(half_sent.wait(), 10)
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            await reads_one_whole_version(http)
        assert (await call(http, "GET", path))[1]["model"] == "v1"

        # Clients that give up at moments spread over a whole PUT's time: sending,
        # parsing, storing, committing. Each chat reads back as one of the writes, whole.
        for step in range(LEAVINGS):
            n = 4 + step
            written[n] = versioned(chat_id, n)
            patience = aiohttp.ClientTimeout(total=whole_put * (step + 1) / LEAVINGS)
            async with aiohttp.ClientSession(qp.url, timeout=patience) as leaving:
                try:
                    async with leaving.put(path, json={"chat": written[n]}) as answer:
                        assert answer.status == 200, await answer.text()
                except TimeoutError:
                    pass
            await reads_one_whole_version(http)

        await wait_until(settled, 10, "the writes finished and their garbage collected")
        await reads_one_whole_version(http)

        # The server still serves: a healthy answer, and a write that reads back whole.
        async with http.get("/healthz") as health:
            assert health.status == 200, await health.text()
        last = versioned(chat_id, 100)
        written[100] = last
        assert await call(http, "PUT", path, json={"chat": last}) == SUCCESS
        await read_whole(http, last)
        await wait_until(settled, 10, "the superseded blob collected")
    assert "Traceback" not in qp.log(), qp.log()
