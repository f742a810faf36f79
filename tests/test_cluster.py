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
import pytest

from tests.fake_openrouter import FakeOpenRouter, Script
from tests.helpers import ADMIN_KEY, call, completion_request, create, make_chat
from tests.processes import (
    NEEDS_NGINX,
    ROOT,
    Nginx,
    PostgresServer,
    QPServer,
    SeaweedFS,
    free_ports,
)

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
    database: str

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
def start_cluster(
    tmp_path: Path, postgres: PostgresServer, seaweed: SeaweedFS, shared_bucket: str
) -> Iterator:
    started: list[Cluster] = []

    def start(**env: str) -> Cluster:
        url = postgres.create_database()
        shared = {
            "QP_DATABASE": url,
            **seaweed.server_env(shared_bucket, f"cluster-{uuid.uuid4().hex[:8]}"),
            "ADMIN_KEY": ADMIN_KEY,
            **env,
        }
        one = QPServer(tmp_path / "one", shared).start()
        two = QPServer(tmp_path / "two", shared).start()
        (port,) = free_ports()
        nginx = Nginx(tmp_path / "nginx", cluster_site(port, [one.port, two.port]), port)
        cluster = Cluster(one, two, nginx, url.rsplit("/", 1)[1])
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


def dead_owner_rows(postgres: PostgresServer, database: str, owner: str) -> dict[str, str]:
    rows = postgres.psql(
        f"SELECT chat_id || ' ' || pending FROM chats WHERE pending LIKE '%\"{owner}\"%'",
        database,
    )
    return dict(line.split(" ", 1) for line in rows.splitlines() if line)


def leases(postgres: PostgresServer, database: str) -> dict[str, float]:
    rows = postgres.psql("SELECT owner || ' ' || expires_at FROM write_leases", database)
    return {line.split()[0]: float(line.split()[1]) for line in rows.splitlines() if line}


async def test_a_killed_process_leaves_every_acknowledged_write_and_its_own_to_its_lease(
    start_cluster, postgres
):
    """One process is SIGKILLed under concurrent writes through nginx: nginx moves on to the
    other, every acknowledged write is there, and the survivor leaves the dead process's
    pending writes alone until its lease expires, then finishes or undoes each."""
    cluster = start_cluster(QP_WRITE_LEASE_SECONDS="3")
    acknowledged: dict[str, int] = {}  # chat id -> last version acknowledged
    sent: dict[str, set[int]] = {}  # chat id -> every version sent
    failures: list[str] = []

    async def write(http: aiohttp.ClientSession, chat_id: str, stop: asyncio.Event) -> None:
        """Update the chat again and again until told to stop or cut off."""
        while not stop.is_set():
            version = max(sent[chat_id]) + 1
            sent[chat_id].add(version)
            chat = make_chat(chat_id, app="kill", model=f"v{version}", messages=[f"v{version}"])
            try:
                status = await put(http, chat)
            except aiohttp.ClientError as err:
                failures.append(type(err).__name__)
                return
            if status == 200:
                acknowledged[chat_id] = version
            else:
                failures.append(str(status))

    async with (
        aiohttp.ClientSession(cluster.nginx.url) as http,
        aiohttp.ClientSession(cluster.one.url) as one,
    ):
        chat_ids = [
            await create(http, make_chat(app="kill", model="v0", messages=["v0"])) for _ in range(8)
        ]
        for chat_id in chat_ids:
            acknowledged[chat_id], sent[chat_id] = 0, {0}
        # Through nginx, so both processes write each chat in turn.
        stop = asyncio.Event()
        writers = [asyncio.ensure_future(write(http, chat_id, stop)) for chat_id in chat_ids]
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        assert failures == []
        # Then straight to the first process, which is killed mid-stream: its writes in
        # flight are cut off, and those it acknowledged in its last half second are not
        # settled yet (their notes are cleared in batches). Nothing writes those chats
        # afterwards, so their notes stay for the survivor to find.
        # Meanwhile other chats are written through nginx, before, during and after the kill.
        through_nginx = [
            await create(http, make_chat(app="kill", model="v0", messages=["v0"])) for _ in range(4)
        ]
        for chat_id in through_nginx:
            acknowledged[chat_id], sent[chat_id] = 0, {0}
        before_straight = sum(acknowledged[chat_id] for chat_id in chat_ids)
        stop, stop_nginx = asyncio.Event(), asyncio.Event()
        writers = [asyncio.ensure_future(write(one, chat_id, stop)) for chat_id in chat_ids]
        nginx_writers = [
            asyncio.ensure_future(write(http, chat_id, stop_nginx)) for chat_id in through_nginx
        ]
        # Killed once it has acknowledged a few straight writes (and goes on writing): the
        # latest are always in its batch of notes still to clear.
        deadline = time.monotonic() + 10
        while sum(acknowledged[chat_id] for chat_id in chat_ids) < before_straight + 16:
            assert time.monotonic() < deadline, "the first process acknowledged nothing"
            await asyncio.sleep(0.01)
        stop.set()
        cluster.one.kill()
        killed_at = time.time()
        await asyncio.gather(*writers)
        acknowledged_at_kill = dict(acknowledged)
        await asyncio.sleep(0.5)
        stop_nginx.set()
        await asyncio.gather(*nginx_writers)
        # nginx moved on: the writes through it went on, served by the survivor.
        for chat_id in through_nginx:
            assert acknowledged[chat_id] > acknowledged_at_kill[chat_id]
        await asyncio.sleep(max(0.0, killed_at + 1.2 - time.time()))
        after = leases(postgres, cluster.database)
    # The dead process's lease is the one that stopped being renewed: it ends first.
    dead = min(after, key=after.__getitem__)
    expires = after[dead]
    assert len(after) == 2 and max(after.values()) > expires
    assert expires - killed_at <= 3.0
    left = dead_owner_rows(postgres, cluster.database, dead)
    assert left, "the dead process left no write pending (the load did not reach it)"
    # Until its lease expires, the survivor leaves them exactly as they are (the writers
    # have stopped: nothing else writes those chats).
    while time.time() < expires - 0.2:
        looked = time.time()
        still = dead_owner_rows(postgres, cluster.database, dead)
        if looked < expires:
            assert still == left, "the survivor touched them before the lease expired"
        await asyncio.sleep(0.2)
    # Then it finishes or undoes every one of them, within its next sweeps.
    deadline = time.monotonic() + 10
    while dead_owner_rows(postgres, cluster.database, dead):
        assert time.monotonic() < deadline, "the dead process's writes were never resolved"
        await asyncio.sleep(0.2)
    # Only the writes cut off by the kill failed: straight ones lost their connection, ones
    # through nginx that had reached the dead process got nginx's 502.
    assert set(failures) <= {
        "ClientOSError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "502",
    }
    async with aiohttp.ClientSession(cluster.two.url) as two:
        for chat_id, version in acknowledged.items():
            status, chat = await call(two, "GET", f"/api/chats/{chat_id}")
            assert status == 200
            stored = int(chat["model"][1:])
            # The row and the messages are of one write, at least the last acknowledged
            # one (a later write cut off by the kill may have been finished).
            assert chat["messages"] == [f"v{stored}"]
            assert stored >= version and stored in sent[chat_id]


def test_the_readme_names_the_cluster_site_file():
    assert "deploy/nginx-cluster.conf" in (ROOT / "README.md").read_text()
