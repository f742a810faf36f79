"""SIGKILL of a `server.py` in the middle of concurrent creates and updates, on file blobs and
on S3: after a restart every acknowledged write reads back, and no chat mixes two writes."""

from __future__ import annotations

import aiohttp
import pytest

from tests.app_server import Database
from tests.helpers import CrashWriteLoad, run_qp, unique_id, wait_until

pytestmark = pytest.mark.on_both_backends

WORKERS = 12
# Writes acknowledged before the kill is due.
ACKNOWLEDGED_BEFORE_KILL = 120


async def test_a_server_killed_mid_write_keeps_every_acknowledged_write_whole(
    backend_name, request, qp_server
):
    env = {"QP_MAX_CHATS_PER_APP": "100000"}
    if backend_name == "s3":
        seaweed = request.getfixturevalue("seaweed")
        bucket = request.getfixturevalue("shared_bucket")
        env.update(seaweed.server_env(bucket, f"crash-{unique_id()[:12]}"))
    server = qp_server(**env)
    database = Database(server.data_dir, None)

    def intents() -> set[str]:
        """Chats with a write between its intent and its commit (or cut off there)."""
        return {row["chat_id"] for row in database.rows("SELECT chat_id FROM chat_writes")}

    async with CrashWriteLoad(server.url, WORKERS, pad=20_000) as load:
        await load.wait_acknowledged(ACKNOWLEDGED_BEFORE_KILL)
        # Killed the moment a write is seen between its intent and its commit (the single
        # SQLite writer often has every write queued before its intent).
        await wait_until(lambda: bool(intents()), 10, "a write past its intent")
        server.kill()
    # Every write answered was answered 200; the clients then lost their writes in flight
    # with the server, or were refused a connection.
    lost = {"ServerDisconnectedError", "ClientOSError", "ClientConnectorError"}
    assert load.failures and set(load.failures) <= lost, load.failures
    # The kill landed mid-write: writes that had recorded their intent and not committed.
    cut_off = intents()
    assert cut_off, "no write was between its intent and its commit; nothing was tested"
    assert cut_off <= load.cut_off()
    # Nothing to repair: each blob of a write cut off is known to the tables (its intent),
    # and every row names a blob that is there.
    found = run_qp(server.data_dir, "check", "--min-age", "0", **env)
    assert (found.returncode, found.stdout) == (0, "nothing to repair\n"), found.stderr

    server.start()
    async with aiohttp.ClientSession(server.url) as http:
        versions = await load.check_read_back(http)
    # A write whose intent is left never committed: its chat is as last acknowledged (a
    # create's, not there at all), whatever of its blob was stored.
    for chat_id in cut_off:
        assert versions.get(chat_id) == load.acknowledged.get(chat_id), chat_id
