"""Two server processes on one PostgreSQL and one SeaweedFS, behind real nginx with both as
upstreams (deploy/nginx-cluster.conf): one truth, whichever process a request reaches."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.app_server import Database
from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import (
    ADMIN_KEY,
    KILOBYTE_OF_MESSAGES,
    STORAGE_FULL,
    CrashWriteLoad,
    a_fresh_minute,
    call,
    chat_version,
    completion_request,
    create,
    make_chat,
    run_qp,
    storage_cap,
    unique_id,
    wait_until,
)
from tests.processes import (
    NEEDS_NGINX,
    ROOT,
    Nginx,
    PostgresServer,
    QPServer,
    SeaweedFS,
    free_ports,
)
from tests.slow_s3 import SlowS3

pytestmark = NEEDS_NGINX
SITE = ROOT / "deploy" / "nginx-cluster.conf"


def cluster_site(port: int, upstreams: list[int]) -> str:
    """deploy/nginx-cluster.conf on 127.0.0.1:`port`, its servers swapped for the test's."""
    text = SITE.read_text()
    servers = iter(upstreams)
    text, count = re.subn(
        r"server 127\.0\.0\.1:\d+ ", lambda _: f"server 127.0.0.1:{next(servers)} ", text
    )
    assert count == len(upstreams), "deploy/nginx-cluster.conf: one server line per process"
    text = re.sub(r"^[ \t]*listen \[::\]:80;\n", "", text, flags=re.M)
    text, count = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", text)
    assert count == 1
    return text


@dataclass
class Cluster:
    one: QPServer
    two: QPServer
    nginx: Nginx
    database: Database
    # What both processes were started with, and their blobs' prefix in the bucket.
    env: dict[str, str]
    prefix: str

    def stop(self) -> None:
        self.nginx.stop()
        self.one.stop()
        self.two.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    fake = FakeOpenRouter().start()
    fake.models = []  # no prices: each completion reserves QP_BUDGET_DEFAULT_RESERVE_USD
    fake.scripts["slow"] = Script(headers_delay=1.0)
    yield fake
    fake.stop()


@pytest.fixture
def slow_s3(seaweed: SeaweedFS) -> Iterator[SlowS3]:
    proxy = SlowS3(seaweed.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def start_cluster(
    tmp_path: Path, postgres: PostgresServer, seaweed: SeaweedFS, shared_bucket: str
) -> Iterator:
    started: list[Cluster] = []

    def start(s3_of_one: str | None = None, **env: str) -> Cluster:
        """Two processes on one database and bucket prefix; the first reaches S3 at
        `s3_of_one` (a SlowS3 in front of SeaweedFS), if given."""
        url = postgres.create_database()
        prefix = f"cluster-{uuid.uuid4().hex[:8]}"
        shared = {
            "QP_DATABASE": url,
            **seaweed.server_env(shared_bucket, prefix),
            "ADMIN_KEY": ADMIN_KEY,
            **env,
        }
        through = {"QP_S3_ENDPOINT_URL": s3_of_one} if s3_of_one else {}
        one = QPServer(tmp_path / "one", {**shared, **through}).start()
        two = QPServer(tmp_path / "two", shared).start()
        (port,) = free_ports()
        nginx = Nginx(tmp_path / "nginx", cluster_site(port, [one.port, two.port]), port)
        cluster = Cluster(one, two, nginx, Database(tmp_path, url), shared, prefix)
        started.append(cluster)
        nginx.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


async def put(http: aiohttp.ClientSession, chat: dict) -> int:
    async with http.put(f"/api/chats/{chat['chatId']}", json={"chat": chat}) as response:
        await response.read()
        return response.status


async def test_a_chat_is_one_chat_whichever_process_serves_it(start_cluster):
    cluster = start_cluster()
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        chat_id = await create(one, make_chat(app="shared", model="v0", messages=["v0"]))
        for version in range(1, 21):
            _, read = await call(two, "GET", f"/api/chats/{chat_id}")  # now cached in two
            assert read["model"] == f"v{version - 1}"
            chat = make_chat(chat_id, app="shared", model=f"v{version}", messages=[f"v{version}"])
            writer, reader = (one, two) if version % 2 else (two, one)
            assert await put(writer, chat) == 200
            # Once one process acknowledged the update, the other never serves the old one.
            status, read = await call(reader, "GET", f"/api/chats/{chat_id}")
            assert (status, read["model"], read["messages"]) == (
                200,
                f"v{version}",
                [f"v{version}"],
            )
        admin = {"x-admin-key": ADMIN_KEY}
        deleted = await call(two, "DELETE", f"/api/chats/{chat_id}", headers=admin)
        assert deleted == (200, {"success": True})
        assert await call(one, "GET", f"/api/chats/{chat_id}") == (404, {"error": "Chat not found"})


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_a_limit_of_10_a_minute_admits_exactly_10_across_both(start_cluster):
    cluster = start_cluster(QP_RATE_LIMIT_CHATS="10/minute")
    await a_fresh_minute()
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        answers = await asyncio.gather(
            *(
                call(http, "GET", "/api/chats/missing", headers=forwarded("198.51.100.7"))
                for http in [one, two] * 15
            )
        )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [404] * 10 + [429] * 20
    assert {body["message"] for status, body in answers if status == 429} == {
        "Rate limit exceeded: 10 requests per minute"
    }


async def test_a_block_made_by_one_refuses_the_client_on_the_other(start_cluster):
    cluster = start_cluster(QP_RATE_LIMIT_CHATS="5/minute")
    await a_fresh_minute()
    client = forwarded("198.51.100.9")
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        for _ in range(15):  # 5 served, then 10 refusals: blocked
            await call(one, "GET", "/api/chats/missing", headers=client)
        status, body = await call(one, "GET", "/api/chats/missing", headers=client)
        assert (status, body["message"]) == (429, "IP blocked due to excessive violations")
        deadline = time.monotonic() + 1.0
        while True:
            status, body = await call(two, "GET", "/api/chats/missing", headers=client)
            if body.get("message") == "IP blocked due to excessive violations":
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.02)
        # Another client is still served by both.
        other = forwarded("198.51.100.10")
        assert (await call(two, "GET", "/api/chats/missing", headers=other))[0] == 404


async def test_a_budget_of_10_reservations_admits_exactly_10_of_100_concurrent(start_cluster, fake):
    cluster = start_cluster(
        OPENROUTER_API_KEY="server-key",
        QP_OPENROUTER_URL=fake.url,
        QP_BUDGET_DEFAULT_RESERVE_USD="0.01",
        QP_BUDGET_SERVER_DAILY_USD="0.1",
    )
    request = completion_request("script:slow")

    async def ask(http: aiohttp.ClientSession, n: int) -> int:
        headers = forwarded(f"203.0.113.{n}")
        async with http.post("/api/completion", json=request, headers=headers) as response:
            await response.read()
            return response.status

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(cluster.nginx.url, connector=connector) as http:
        statuses = await asyncio.gather(*(ask(http, n) for n in range(100)))
    assert sorted(statuses) == [200] * 10 + [402] * 90


async def test_a_total_storage_cap_of_4_chats_admits_exactly_4_across_both(start_cluster):
    cluster = start_cluster(QP_MAX_TOTAL_STORAGE_GB=storage_cap(4500))
    chat = {"chat": make_chat(app="capped", messages=KILOBYTE_OF_MESSAGES)}
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        answers = await asyncio.gather(
            *(call(http, "POST", "/api/chats", json=chat) for http in [one, two] * 15)
        )
    assert sorted(status for status, _ in answers) == [200] * 4 + [507] * 26
    assert [answer for answer in answers if answer[0] == 507] == [STORAGE_FULL] * 26
    stored = cluster.database.rows("SELECT messages_bytes FROM chats")
    assert stored == [{"messages_bytes": 1000}] * 4
    # What the processes count is what the rows hold.
    (counted,) = cluster.database.rows("SELECT SUM(bytes) AS total FROM chat_bytes")
    assert counted == {"total": 4000}
    # No intent left: a write refused at its commit (its blob put) made its blob garbage.
    assert cluster.database.rows("SELECT rev FROM chat_writes") == []


async def test_a_delete_on_one_process_makes_room_on_the_other_at_once(start_cluster):
    cluster = start_cluster(QP_MAX_TOTAL_STORAGE_GB=storage_cap(2500))
    chat = {"chat": make_chat(app="capped", messages=KILOBYTE_OF_MESSAGES)}
    admin = {"x-admin-key": ADMIN_KEY}
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        first = await create(one, chat["chat"])
        await create(one, chat["chat"])
        assert await call(two, "POST", "/api/chats", json=chat) == STORAGE_FULL
        # An update that would grow a chat past the cap is refused too, on either.
        bigger = make_chat(first, app="capped", messages=["x" * 1500])
        assert await call(two, "PUT", f"/api/chats/{first}", json={"chat": bigger}) == STORAGE_FULL
        deleted = await call(one, "DELETE", f"/api/chats/{first}", headers=admin)
        assert deleted == (200, {"success": True})
        assert (await call(two, "POST", "/api/chats", json=chat))[0] == 200
        assert await call(one, "POST", "/api/chats", json=chat) == STORAGE_FULL
    assert cluster.database.rows("SELECT SUM(messages_bytes) AS total FROM chats") == [
        {"total": 2000}
    ]


# The dead process's lease, in seconds (the shortest start-up allows).
LEASE_SECONDS = 3.0
# How long past the dead process's lease the survivor's answers are still watched.
PAST_THE_LEASE = 2.0
LOST = {"ServerDisconnectedError", "ClientOSError", "ClientConnectorError"}


async def test_after_a_process_is_killed_mid_write_the_other_serves_only_whole_writes(
    start_cluster, slow_s3
):
    """One process is SIGKILLed under writes made straight to it, while others go through
    nginx: from the kill until past its lease, every chat read through the survivor is one
    whole write, no older than the last acknowledged, and never goes back; nginx moves the
    writes through it on to the survivor, and every acknowledged write reads back."""
    cluster = start_cluster(
        s3_of_one=slow_s3.endpoint_url,
        QP_WRITE_LEASE_SECONDS=f"{LEASE_SECONDS:g}",
        QP_MAX_CHATS_PER_APP="100000",
    )
    straight = CrashWriteLoad(cluster.one.url, workers=8, prefix="straight")
    through_nginx = CrashWriteLoad(cluster.nginx.url, workers=4, prefix="nginx")
    seen: dict[str, int] = {}  # chat id -> the version the survivor last answered

    async def read(http: aiohttp.ClientSession, load: CrashWriteLoad, chat_id: str) -> None:
        # What is known before the GET is sent (a create acknowledged while it is on its
        # way may still be missing to it).
        at_least = max(load.acknowledged.get(chat_id, 0), seen.get(chat_id, 0))
        there = chat_id in load.acknowledged or chat_id in seen
        status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
        if status == 404 and not there:
            return  # a create not committed yet, or cut off by the kill
        assert status == 200, f"{chat_id}: {status} {chat}"
        seen[chat_id] = load.whole_version(chat_id, chat, at_least)

    async with aiohttp.ClientSession(cluster.two.url) as two, through_nginx:
        async with straight:
            await straight.wait_acknowledged(60)
            await through_nginx.wait_acknowledged(20)
            # The kill lands mid-write, however loaded the machine: the first process's
            # blob PUTs are answered no more once SeaweedFS has stored them, so a straight
            # write whose blob is stored is between its intent and its commit.
            answers = slow_s3.hold("PUT")
            landed = len(slow_s3.rule("PUT").landed)
            await wait_until(
                lambda: any(
                    "/chats/straight-" in path for path in slow_s3.rule("PUT").landed[landed:]
                ),
                30,
                "a straight write's blob stored",
            )
            cluster.one.kill()
            killed_at = time.monotonic()
            answers.set()
        acknowledged_at_kill = through_nginx.acknowledgements
        rounds = 0
        while time.monotonic() < killed_at + LEASE_SECONDS + PAST_THE_LEASE:
            await asyncio.gather(
                *(read(two, straight, chat_id) for chat_id in list(straight.sent)),
                *(read(two, through_nginx, chat_id) for chat_id in list(through_nginx.sent)),
            )
            rounds += 1
        await through_nginx.stop()
        # The survivor answered all along, and outlived the dead process's lease.
        assert rounds >= 5
        leases = cluster.database.rows("SELECT expires_at FROM write_leases")
        assert sorted(row["expires_at"] < time.time() for row in leases) == [False, True]
        # The kill landed mid-write: writes it cut off left their intents.
        intents = {
            row["chat_id"] for row in cluster.database.rows("SELECT chat_id FROM chat_writes")
        }
        assert intents & straight.cut_off(), "no write was cut off between intent and commit"
        assert intents <= set(straight.sent) | set(through_nginx.sent)
        # Those never committed: their chats are as last acknowledged (a create's, absent).
        for chat_id in intents & set(straight.sent):
            assert seen.get(chat_id) == straight.acknowledged.get(chat_id), chat_id
        # Straight writes lost their connection; those nginx had sent to the dead process
        # got its 502; nginx sent the rest to the survivor.
        assert straight.failures and set(straight.failures) <= LOST
        assert set(through_nginx.failures) <= {"502"}
        assert through_nginx.acknowledgements > acknowledged_at_kill
        # Nothing wrote the straight chats after the kill: they read as the survivor served
        # them all along.
        versions = await straight.check_read_back(two)
        assert versions == {chat_id: seen[chat_id] for chat_id in versions}
        assert set(versions) == set(seen) & set(straight.sent)
        await through_nginx.check_read_back(two)


async def test_a_put_of_the_killed_process_that_lands_late_changes_nothing_visible(
    start_cluster, slow_s3, seaweed, shared_bucket, tmp_path
):
    """The first process reaches S3 through SlowS3, which holds its PUT's answer once
    SeaweedFS has stored it; the process is SIGKILLed, then the answer let go. Through the
    survivor the chat stays exactly the last acknowledged version, before and after the
    dead process's lease; the dead write's blob stays known to the tables, as an intent."""
    cluster = start_cluster(
        s3_of_one=slow_s3.endpoint_url, QP_WRITE_LEASE_SECONDS=f"{LEASE_SECONDS:g}"
    )
    chat_id = unique_id()
    versions = [chat_version(chat_id, n, "late") for n in range(3)]
    async with (
        aiohttp.ClientSession(cluster.one.url) as one,
        aiohttp.ClientSession(cluster.two.url) as two,
    ):
        await create(one, versions[0])
        async with one.put(f"/api/chats/{chat_id}", json={"chat": versions[1]}) as response:
            assert (response.status, await response.json()) == (200, {"success": True})
            etag = response.headers["ETag"]
        async with two.get(f"/api/chats/{chat_id}") as response:
            assert (response.status, response.headers["ETag"]) == (200, etag)
            acknowledged = await response.read()
        whole = orjson.loads(acknowledged)
        assert (whole["model"], whole["messages"]) == ("v1", versions[1]["messages"])

        answers = slow_s3.hold("PUT")
        landed = len(slow_s3.rule("PUT").landed)
        late = asyncio.ensure_future(put(one, versions[2]))
        assert await asyncio.to_thread(slow_s3.wait_landed, "PUT", landed + 1, 10)
        cluster.one.kill()
        killed_at = time.monotonic()
        answers.set()
        with pytest.raises(aiohttp.ClientError):
            await late
        # The dead write's blob is stored whole, under a revision no row names.
        key = slow_s3.rule("PUT").landed[landed].split("/", 2)[2]
        dead_rev = key.rsplit("/", 1)[1].removesuffix(".json")
        assert key == f"{cluster.prefix}/chats/{chat_id}/{dead_rev}.json"
        stored = seaweed.get_object(shared_bucket, key)
        assert stored is not None and orjson.loads(stored) == versions[2]["messages"]
        assert f'"{dead_rev}"' != etag

        reads = 0
        while time.monotonic() < killed_at + LEASE_SECONDS + PAST_THE_LEASE or reads < 10:
            async with two.get(f"/api/chats/{chat_id}") as response:
                assert (response.status, response.headers["ETag"]) == (200, etag)
                assert await response.read() == acknowledged
            reads += 1
        headers = {"If-None-Match": etag}
        async with two.get(f"/api/chats/{chat_id}", headers=headers) as response:
            assert (response.status, await response.read()) == (304, b"")
    # Given up only past QP_WRITE_ABANDON_SECONDS, the dead write is still an intent: its
    # blob is neither served nor taken for one nothing knows.
    intents = cluster.database.rows("SELECT chat_id, rev FROM chat_writes")
    assert intents == [{"chat_id": chat_id, "rev": dead_rev}]
    found = run_qp(tmp_path / "cli", "check", "--min-age", "0", **cluster.env)
    assert (found.returncode, found.stdout) == (0, "nothing to repair\n"), found.stderr


def test_the_several_processes_page_names_the_cluster_site_file():
    assert "deploy/nginx-cluster.conf" in (ROOT / "docs" / "several-processes.md").read_text()
