"""Garbage collection of chat blobs, with real `server.py` processes on SeaweedFS behind
SlowS3 (a proxy whose answers a test holds): the blobs of writes killed before their commit
are collected within the bound, a blob is never collected while its row names it, and a
writer stopped between its blob's PUT and its commit past the bound fails its request
instead of committing a row whose blob the collector removed."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.app_server import Database
from tests.helpers import chat_version, create, run_qp, unique_id, wait_until
from tests.processes import QPServer, SeaweedFS
from tests.slow_s3 import SlowS3

S3_TIMEOUT = 1.0
# Writes are given up this long after their intent: the least start-up allows beside
# QP_S3_TIMEOUT (twice it). Housekeeping then sweeps every min(60, bound / 4) s, at least
# once a second: every second.
ABANDON_SECONDS = 2.0
SWEEP_SECONDS = 1.0
# What a loaded machine may add to a sweep's round (and to a restart).
SLACK = 4.0
BOUND = {
    "QP_S3_TIMEOUT": f"{S3_TIMEOUT:g}",
    "QP_WRITE_ABANDON_SECONDS": f"{ABANDON_SECONDS:g}",
}
STORAGE_UNAVAILABLE = (503, {"error": "Storage unavailable"})


@dataclass
class Blobs:
    """The servers' prefix in the bucket, looked at behind their back."""

    seaweed: SeaweedFS
    bucket: str
    prefix: str

    def server_env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """A server's environment for this prefix; through `endpoint_url` (SlowS3) if given."""
        env = self.seaweed.server_env(self.bucket, self.prefix)
        return {**env, "QP_S3_ENDPOINT_URL": endpoint_url} if endpoint_url else env

    def stored(self) -> set[str]:
        """Every blob stored, by its key under the prefix (`chats/...`)."""
        found = self.seaweed.client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")
        return {item["Key"][len(self.prefix) + 1 :] for item in found.get("Contents", [])}

    def key_of(self, landed_path: str) -> str:
        """The key under the prefix of a PUT that landed (SlowS3 gives `/bucket/prefix/key`)."""
        start = f"/{self.bucket}/{self.prefix}/"
        assert landed_path.startswith(start), landed_path
        return landed_path[len(start) :]


@pytest.fixture
def blobs(seaweed: SeaweedFS, shared_bucket: str) -> Blobs:
    return Blobs(seaweed, shared_bucket, f"garbage-{uuid.uuid4().hex[:12]}")


def named(db: Database) -> set[str]:
    """The keys the chats' rows name."""
    rows = db.rows("SELECT chat_id, blob_rev FROM chats")
    return {f"chats/{row['chat_id']}/{row['blob_rev']}.json" for row in rows}


def unfinished(db: Database) -> list[dict]:
    """Write intents and garbage the tables still hold."""
    return db.rows(
        "SELECT chat_id, rev FROM chat_writes UNION ALL SELECT chat_id, rev FROM chat_garbage"
    )


async def send(http: aiohttp.ClientSession, method: str, chat: dict) -> tuple[int, dict, str]:
    """A create (POST) or update (PUT) of `chat`: its status, body and ETag."""
    path = "/api/chats" if method == "POST" else f"/api/chats/{chat['chatId']}"
    async with http.request(method, path, json={"chat": chat}) as response:
        return response.status, await response.json(), response.headers.get("ETag", "")


async def read(http: aiohttp.ClientSession, chat_id: str) -> tuple[int, bytes, str]:
    """A GET of the chat: its status, body and ETag."""
    async with http.get(f"/api/chats/{chat_id}") as response:
        return response.status, await response.read(), response.headers.get("ETag", "")


def whole(body: bytes, chat: dict) -> bool:
    """The body is `chat`, one whole write: its model, usage and messages."""
    got = orjson.loads(body)
    fields = ("chatId", "app", "model", "totalUsage", "messages")
    return {key: got.get(key) for key in fields} == {key: chat[key] for key in fields}


async def test_the_blobs_of_writes_killed_before_their_commit_are_collected_within_the_bound(
    qp_server, blobs, slow_s3
):
    """A server is SIGKILLed while SeaweedFS holds the blobs of an update and a create whose
    answers SlowS3 holds. Restarted, its sweeps give both writes up and delete their blobs
    within the bound, while the chats, read and updated meanwhile, keep every blob their rows
    name: in the end the bucket holds exactly the rows' blobs."""
    env = {**blobs.server_env(slow_s3.endpoint_url), **BOUND}
    server = qp_server(**env)
    db = Database(server.data_dir, None)
    holds: dict[str, int] = {}  # chat id -> the version its row names
    async with aiohttp.ClientSession(server.url) as http:
        for _ in range(4):
            chat_id = await create(http, chat_version(unique_id(), 0, "gc"))
            for n in (1, 2):
                assert (await send(http, "PUT", chat_version(chat_id, n, "gc")))[0] == 200
            holds[chat_id] = 2
        # The versions the updates superseded are deleted just after their commits.
        await wait_until(lambda: blobs.stored() == named(db), 10, "superseded blobs deleted")

        answers = slow_s3.hold("PUT")
        landed = len(slow_s3.rule("PUT").landed)
        updated, created = next(iter(holds)), unique_id()
        cut_off = [
            asyncio.ensure_future(send(http, "PUT", chat_version(updated, 3, "gc"))),
            asyncio.ensure_future(send(http, "POST", chat_version(created, 0, "gc"))),
        ]
        assert await asyncio.to_thread(slow_s3.wait_landed, "PUT", landed + 2, 10)
        server.kill()
        answers.set()
        for request in cut_off:
            with pytest.raises(aiohttp.ClientError):
                await request
    orphans = {blobs.key_of(path) for path in slow_s3.rule("PUT").landed[landed:]}
    assert len(orphans) == 2 and orphans <= blobs.stored()
    intents = db.rows("SELECT chat_id, rev, started_at FROM chat_writes")
    assert {f"chats/{row['chat_id']}/{row['rev']}.json" for row in intents} == orphans
    begun = max(row["started_at"] for row in intents)

    server.start()
    # Given up once older than the bound, at the first sweep after that (or after the
    # restart); a sweep deletes the blobs of the writes it gives up.
    deadline = max(begun + ABANDON_SECONDS, time.time()) + SWEEP_SECONDS + SLACK
    async with aiohttp.ClientSession(server.url) as http:
        n = 0
        while orphans & blobs.stored():
            assert time.time() < deadline, "the killed writes' blobs were not collected"
            for chat_id, version in holds.items():
                status, body, _ = await read(http, chat_id)
                assert status == 200 and whole(body, chat_version(chat_id, version, "gc"))
            # Sweeps meet writes in flight: none of those is given up, nor its blob taken.
            chat_id = list(holds)[n % len(holds)]
            n += 1
            update = chat_version(chat_id, holds[chat_id] + 1, "gc")
            assert (await send(http, "PUT", update))[0] == 200
            holds[chat_id] += 1
        status, body, _ = await read(http, created)
        assert (status, orjson.loads(body)) == (404, {"error": "Chat not found"})
        for chat_id, version in holds.items():
            status, body, _ = await read(http, chat_id)
            assert status == 200 and whole(body, chat_version(chat_id, version, "gc"))
    # What is left is exactly the blobs the rows name, and the tables owe nothing.
    await wait_until(lambda: blobs.stored() == named(db), 10, "only the named blobs left")
    await wait_until(lambda: unfinished(db) == [], 10, "intents and garbage all done")


async def stop_writer_past_the_bound(
    writer: QPServer,
    reader: aiohttp.ClientSession,
    writer_http: aiohttp.ClientSession,
    slow_s3: SlowS3,
    blobs: Blobs,
    db: Database,
    collect,
) -> None:
    """The chat is at v1; the writer's update to v2 lands in SeaweedFS, its answer held
    by SlowS3; the writer is SIGSTOPped, the answer let go, and `collect(intent)` run (it
    gives the write up and deletes its blob); then the writer is SIGCONTinued. Its client
    gets 503, the chat reads v1 whole, as before, and its row names a blob that is there."""
    chat_id = await create(reader, chat_version(unique_id(), 0, "gc"))
    v1, v2 = chat_version(chat_id, 1, "gc"), chat_version(chat_id, 2, "gc")
    assert (await send(reader, "PUT", v1))[:2] == (200, {"success": True})
    before = await read(reader, chat_id)
    assert before[0] == 200 and whole(before[1], v1)
    # v0's blob, superseded, is deleted a moment after v1's commit, then its garbage row
    # (a sweep that still found the row would delete it again, and count it).
    await wait_until(
        lambda: blobs.stored() == named(db) and unfinished(db) == [],
        10,
        "the superseded blob and its garbage row deleted",
    )

    answers = slow_s3.hold("PUT")
    landed = len(slow_s3.rule("PUT").landed)
    writing = asyncio.ensure_future(send(writer_http, "PUT", v2))
    assert await asyncio.to_thread(slow_s3.wait_landed, "PUT", landed + 1, 10)
    writer.signal(signal.SIGSTOP)
    try:
        answers.set()
        key = blobs.key_of(slow_s3.rule("PUT").landed[landed])
        assert key in blobs.stored()
        (intent,) = db.rows("SELECT chat_id, rev, started_at FROM chat_writes")
        assert f"chats/{intent['chat_id']}/{intent['rev']}.json" == key
        await collect(intent)
        assert key not in blobs.stored()
        assert unfinished(db) == []
    finally:
        writer.signal(signal.SIGCONT)
    # Its commit found its intent gone (or its PUT had timed out): it failed, changing nothing.
    status, body, _ = await writing
    assert (status, body) == STORAGE_UNAVAILABLE
    assert await read(reader, chat_id) == before
    assert await read(writer_http, chat_id) == before
    assert blobs.stored() == named(db)


async def test_a_writer_stopped_past_the_bound_fails_once_check_repair_gave_it_up(
    qp_server, blobs, slow_s3
):
    """SQLite: while the writer is stopped, `check --repair` (the same bound) gives its
    write up once older than the bound, and deletes its blob."""
    env = {**blobs.server_env(slow_s3.endpoint_url), **BOUND}
    server = qp_server(**env)
    db = Database(server.data_dir, None)

    async def check_repair(intent: dict) -> None:
        await wait_until(
            lambda: time.time() > intent["started_at"] + ABANDON_SECONDS, 10, "past the bound"
        )
        repaired = await asyncio.to_thread(
            run_qp, server.data_dir, "check", "--repair", "--min-age", "0", **env
        )
        assert (repaired.returncode, repaired.stdout) == (
            0,
            "nothing to repair\ndeleted 1 blobs no row names\n",
        ), repaired.stderr

    async with aiohttp.ClientSession(server.url) as http:
        await stop_writer_past_the_bound(server, http, http, slow_s3, blobs, db, check_repair)


async def test_a_writer_stopped_past_the_bound_fails_once_the_other_process_gave_it_up(
    qp_server, postgres, blobs, slow_s3
):
    """PostgreSQL, two processes: while the writer (through SlowS3) is stopped, the other
    process's housekeeping gives its write up past the bound and deletes its blob."""
    shared = {**blobs.server_env(), "QP_DATABASE": postgres.create_database(), **BOUND}
    writer = qp_server("writer", **{**shared, "QP_S3_ENDPOINT_URL": slow_s3.endpoint_url})
    other = qp_server("other", **shared)
    db = Database(other.data_dir, shared["QP_DATABASE"])

    async def swept(intent: dict) -> None:
        deadline = intent["started_at"] + ABANDON_SECONDS + SWEEP_SECONDS + SLACK
        await wait_until(
            lambda: unfinished(db) == [], deadline - time.time(), "the other process's sweep"
        )

    async with (
        aiohttp.ClientSession(writer.url) as writer_http,
        aiohttp.ClientSession(other.url) as other_http,
    ):
        await stop_writer_past_the_bound(writer, other_http, writer_http, slow_s3, blobs, db, swept)
