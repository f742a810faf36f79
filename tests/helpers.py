"""What the tests share: chats and bodies to send, HTTP calls, the CLI runner, a write load."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from qp.policy.policy import DEFAULT_REQUIRED_PHRASE_GROUPS
from qp.spend.budgets import BudgetBook
from qp.spend.shared_budgets import SharedAccounts
from qp.storage.database import Database, Transaction
from tests.app_server import AppServer
from tests.processes import ROOT, QPServer

ADMIN_KEY = "test-admin-key"
ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
# A system prompt the default policy accepts: it holds one phrase of each required group.
SYSTEM = "You help with NWB files. " + " ".join(
    group[0] for group in DEFAULT_REQUIRED_PHRASE_GROUPS
)
# A chat of 1,000 bytes of messages (stored as sent: orjson's encoding of the array).
KILOBYTE_OF_MESSAGES = ["x" * 996]
STORAGE_FULL = (507, {"error": "Insufficient storage"})


OLD_POSTGRES_STEPS = ROOT / "tests" / "fixtures" / "postgres-old-steps"


def old_postgres_schema(version: int) -> str:
    """The SQL that leaves a new PostgreSQL database as a server of its old numbering's
    `version` (1..6, before the one list of named steps) did: its steps and qp_schema."""
    steps = [(OLD_POSTGRES_STEPS / f"{step}.sql").read_text() for step in range(1, version + 1)]
    recorded = "CREATE TABLE qp_schema (version INTEGER NOT NULL);\n"
    recorded += f"INSERT INTO qp_schema (version) VALUES ({version});\n"
    return "\n".join([*steps, recorded])


def unique_id() -> str:
    return uuid.uuid4().hex


def completion_request(
    content: str = "hi",
    app: str = "nwb-assistant",
    *,
    leave_out: tuple[str, ...] = (),
    **fields: Any,
) -> dict:
    """A completion request the default policy accepts: one user message saying `content`
    (the fake OpenRouter picks its script by it), from `app`. `fields` add or replace fields
    (`model=`, `messages=`, `tools=`, ...); those named in `leave_out` are not sent."""
    request = {
        "model": "openai/gpt-4.1-mini",
        "systemMessage": SYSTEM,
        "messages": [{"role": "user", "content": content}],
        "app": app,
        **fields,
    }
    return {name: value for name, value in request.items() if name not in leave_out}


def make_chat(
    chat_id: str | None = None,
    app: str = "test-app",
    model: str = "openai/gpt-4.1-mini",
    messages: list | None = None,
    usage: tuple[float, float, float] = (12, 40, 0.0001),
) -> dict:
    """A valid Chat as clients send it."""
    chat: dict = {
        "app": app,
        "model": model,
        "messages": [{"role": "user", "content": "hello"}] if messages is None else messages,
        "totalUsage": {
            "promptTokens": usage[0],
            "completionTokens": usage[1],
            "estimatedCost": usage[2],
        },
    }
    if chat_id is not None:
        chat["chatId"] = chat_id
    return chat


def storage_cap(size: float) -> str:
    """QP_MAX_TOTAL_STORAGE_GB for a cap of `size` bytes."""
    return repr(size / 2**30)


def run_qp(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m qp ARGS` on a data folder, with the server's environment stripped."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QP_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "qp", *args],
        cwd=ROOT,
        env={**clean, "QP_DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def body_of_size(total: int, app: str) -> bytes:
    """A create body of exactly `total` bytes."""
    base = orjson.dumps({"chat": make_chat(unique_id(), app=app, messages=[""])})
    padding = total - len(base)
    return base.replace(b'"messages":[""]', b'"messages":["' + b"a" * padding + b'"]')


def big_chat(chat_id: str, app: str, mebibytes: float) -> bytes:
    """A create body `{"chat": ...}` just under `mebibytes` MiB, of many small messages
    (the shape that costs most memory once parsed)."""
    target = int(mebibytes * 1024 * 1024) - 4096
    one = len(orjson.dumps({"role": "assistant", "content": "turn 1000000"})) + 1
    messages = [
        {"role": "user" if n % 2 else "assistant", "content": f"turn {n}"}
        for n in range(target // one)
    ]
    return orjson.dumps({"chat": make_chat(chat_id, app=app, messages=messages)})


async def call(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    """Status and parsed JSON body (every answer of this API is JSON)."""
    async with http.request(method, path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


async def create(http: aiohttp.ClientSession, chat: dict) -> str:
    status, body = await call(http, "POST", "/api/chats", json={"chat": chat})
    assert status == 200, body
    return body["chatId"]


def chat_version(chat_id: str, n: int, app: str = "load") -> dict:
    """Version n of a chat: model, messages and usage all say n, so a torn chat shows."""
    return make_chat(
        chat_id,
        app=app,
        model=f"v{n}",
        messages=[{"role": "user", "content": f"{chat_id} version {n}"}],
        usage=(n, n, n / 1000),
    )


class WriteLoad:
    """Clients creating and updating chats at once until stopped, remembering every write
    the server acknowledged, so that each can be read back afterwards."""

    def __init__(self, url: str, workers: int = 8, prefix: str = "load"):
        self.url = url
        self.workers = workers
        self.prefix = prefix
        self.acknowledged: dict[str, int] = {}
        self.refused: list[tuple[str, int, Any]] = []  # (method, status, body) not 200
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WriteLoad:
        self._http = aiohttp.ClientSession(self.url)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 60)
        finally:
            await self._http.close()

    async def _worker(self, number: int) -> None:
        mine: list[str] = []
        n = 0
        while not self._stop.is_set():
            n += 1
            if not mine or n % 3 == 0:
                chat_id = f"{self.prefix}-{number}-{n}"
                version, method, path = 0, "POST", "/api/chats"
            else:
                chat_id = mine[n % len(mine)]
                version = self.acknowledged[chat_id] + 1
                method, path = "PUT", f"/api/chats/{chat_id}"
            chat = chat_version(chat_id, version, self.prefix)
            status, body = await call(self._http, method, path, json={"chat": chat})
            if status != 200:
                self.refused.append((method, status, body))
                continue
            if method == "POST":
                mine.append(chat_id)
            self.acknowledged[chat_id] = version

    async def check_all_read_back(self, http: aiohttp.ClientSession) -> None:
        """Every acknowledged chat answers with the last version acknowledged, whole."""
        assert len(self.acknowledged) > 10, "the load did not get going"
        for chat_id, version in sorted(self.acknowledged.items()):
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            assert status == 200, f"{chat_id}: acknowledged v{version}, now {status} {chat}"
            expected = chat_version(chat_id, version, self.prefix)
            assert (chat["model"], chat["messages"], chat["totalUsage"]) == (
                expected["model"],
                expected["messages"],
                expected["totalUsage"],
            ), f"{chat_id}: acknowledged v{version}, now {chat['model']}"


async def wait_for_log(server: QPServer, text: str, count: int = 1) -> None:
    """Until the server's log holds `text` `count` times (5 s at most)."""
    deadline = time.monotonic() + 5
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()}"
        await asyncio.sleep(0.05)


def ledger(server: AppServer | QPServer) -> list[dict]:
    """The ledger's rows, oldest first, from the server's database: an in-process server's
    SQLite or PostgreSQL, a process's SQLite file."""
    query = "SELECT * FROM completions ORDER BY id"
    if isinstance(server, AppServer):
        return server.database.rows(query)
    with sqlite3.connect(server.data_dir / "qp.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(query)]


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Until `condition()` holds, checked every 50 ms; fails naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: still not so after {seconds} s"
        await asyncio.sleep(0.05)


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, seconds: float = 60) -> None:
    """Until `await probe()` holds, tried every 50 ms; fails naming `what` after `seconds`
    (a bound against hanging, far past what anything tested should need under load)."""
    deadline = time.monotonic() + seconds
    while not await probe():
        assert time.monotonic() < deadline, f"{what}: still so after {seconds} s"
        await asyncio.sleep(0.05)


class CrashWriteLoad:
    """Clients creating and updating chats until stopped, or until the server they write to
    is gone (killed under them): every version of each chat sent, and the last one
    acknowledged. Each chat is written by one client, one version at a time, so it can
    only ever hold a version that was sent, and none older than the last acknowledged.
    Version n's model, usage and messages all say n (messages padded by `pad` bytes times
    1 to 3), so a chat mixing two writes shows."""

    def __init__(self, url: str, workers: int = 8, prefix: str = "crash", pad: int = 0):
        self.url = url
        self.workers = workers
        self.prefix = prefix
        self.pad = pad
        self.sent: dict[str, set[int]] = {}
        self.acknowledged: dict[str, int] = {}
        # Writes not acknowledged: the status, or the name of the client's error.
        self.failures: list[str] = []
        self.acknowledgements = 0
        self._progress = asyncio.Condition()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CrashWriteLoad:
        self._http = aiohttp.ClientSession(self.url)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Let each client finish the write it is making (or lose it with its server)."""
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 60)
        finally:
            if self._http is not None:
                await self._http.close()

    def version(self, chat_id: str, n: int) -> dict:
        chat = chat_version(chat_id, n, self.prefix)
        if self.pad:
            filler = "x" * (self.pad * (n % 3 + 1))
            chat["messages"].append({"role": "assistant", "content": filler})
        return chat

    async def wait_acknowledged(self, count: int, seconds: float = 20) -> None:
        """Until the server has acknowledged `count` writes in all."""
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self.acknowledgements >= count), seconds
                )
            except TimeoutError:
                raise AssertionError(
                    f"{self.acknowledgements} writes acknowledged after {seconds} s, not"
                    f" {count}; refused: {self.failures[-5:]}"
                ) from None

    def cut_off(self) -> set[str]:
        """Chats whose latest write was sent and never acknowledged."""
        return {
            chat_id
            for chat_id, versions in self.sent.items()
            if max(versions) > self.acknowledged.get(chat_id, -1)
        }

    def whole_version(self, chat_id: str, chat: dict, at_least: int | None = None) -> int:
        """The version a GET's body holds, after checking it is that version whole, one that
        was sent, and no older than the last acknowledged (or `at_least`)."""
        n = int(chat["model"][1:])
        assert n in self.sent[chat_id], f"{chat_id}: v{n}, but only {self.sent[chat_id]} sent"
        expected = self.version(chat_id, n)
        fields = ("chatId", "app", "model", "totalUsage", "messages")
        assert {key: chat.get(key) for key in fields} == {key: expected[key] for key in fields}, (
            f"{chat_id} is not one whole write: model {chat['model']}"
        )
        least = self.acknowledged.get(chat_id, 0) if at_least is None else at_least
        assert n >= least, f"{chat_id}: acknowledged v{least}, now v{n}"
        return n

    async def check_read_back(self, http: aiohttp.ClientSession) -> dict[str, int]:
        """Every chat sent reads back whole (a create never acknowledged may be missing);
        answers each chat's version."""
        assert len(self.acknowledged) > 10, "the load did not get going"
        found: dict[str, int] = {}
        for chat_id in sorted(self.sent):
            status, chat = await call(http, "GET", f"/api/chats/{chat_id}")
            if status == 404 and chat_id not in self.acknowledged:
                continue
            assert status == 200, f"{chat_id}: acknowledged, now {status} {chat}"
            found[chat_id] = self.whole_version(chat_id, chat)
        return found

    async def _worker(self, number: int) -> None:
        assert self._http is not None
        mine: list[str] = []
        n = 0
        while not self._stop.is_set():
            n += 1
            if not mine or n % 3 == 0:
                chat_id, version = f"{self.prefix}-{number}-{n}", 0
                method, path = "POST", "/api/chats"
            else:
                chat_id = mine[n % len(mine)]
                version = max(self.sent[chat_id]) + 1
                method, path = "PUT", f"/api/chats/{chat_id}"
            self.sent.setdefault(chat_id, set()).add(version)
            body = {"chat": self.version(chat_id, version)}
            try:
                async with self._http.request(method, path, json=body) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as err:
                self.failures.append(type(err).__name__)
                return  # the server is gone
            if status != 200:
                self.failures.append(str(status))
                continue
            if method == "POST":
                mine.append(chat_id)
            self.acknowledged[chat_id] = version
            async with self._progress:
                self.acknowledgements += 1
                self._progress.notify_all()


# --- blocks -----------------------------------------------------------------------------

BLOCKED_BODY = "IP blocked due to excessive violations"


async def a_fresh_hour(seconds: float = 60) -> None:
    """Wait for the next hour if this one ends within `seconds`: a test counting
    against an hourly limit must not see its window roll over midway."""
    left = 3600 - time.time() % 3600
    if left < seconds:
        await asyncio.sleep(left + 0.1)


async def a_fresh_minute(seconds: float = 10) -> None:
    """Wait for the next minute if this one ends within `seconds`: the limits count in
    fixed windows, so a test that expects a refusal must not see its minute roll over
    between the requests it counts."""
    left = 60 - time.time() % 60
    if left < seconds:
        await asyncio.sleep(left + 0.1)


async def block_by_refusals(http: aiohttp.ClientSession, client: dict[str, str]) -> None:
    """Block a client that may make one chats request an hour: one served, ten refused."""
    assert (await call(http, "GET", "/api/chats/nothing", headers=client))[0] == 404
    for _ in range(10):
        assert (await call(http, "GET", "/api/chats/nothing", headers=client))[0] == 429
    status, body = await call(http, "GET", "/api/chats/nothing", headers=client)
    assert (status, body["message"]) == (429, BLOCKED_BODY)


async def served_once_then_limited_not_blocked(
    http: aiohttp.ClientSession, client: dict[str, str], wait: bool = False
) -> None:
    """A lifted client (one chats request an hour) starts afresh: its one request is
    served, the next ones are refused by the limit, and none blocks it again. `wait`: the
    block was lifted elsewhere, and is still in force here until the server hears of it
    (a blocked client's requests are not counted, so asking meanwhile costs nothing)."""
    deadline = time.monotonic() + 10
    answer = await call(http, "GET", "/api/chats/nothing", headers=client)
    while wait and answer[0] == 429 and answer[1]["message"] == BLOCKED_BODY:
        assert time.monotonic() < deadline, "the server kept the lifted block"
        await asyncio.sleep(0.05)
        answer = await call(http, "GET", "/api/chats/nothing", headers=client)
    assert answer == (404, {"error": "Chat not found"})
    for _ in range(2):
        assert await call(http, "GET", "/api/chats/nothing", headers=client) == (
            429,
            {
                "error": "Rate limit exceeded",
                "retryAfter": 3600,
                "message": "Rate limit exceeded: 1 requests per hour",
            },
        )


def unhealthy(database: str = "ok", storage: str = "ok") -> tuple[int, dict]:
    """What /healthz answers when a check fails: (status, body)."""
    return 503, {
        "error": "Service unavailable",
        "status": "unavailable",
        "checks": {"database": database, "storage": storage},
    }


def shared_budget_book(
    db: Database, owner: str, clock: Callable[[], float] = time.time
) -> BudgetBook:
    """A budget book with its accounts in a shared PostgreSQL database, as the process
    `owner` (the only one alive, to its chores)."""

    async def alive() -> set[str]:
        return {owner}

    return BudgetBook(SharedAccounts(db, owner, alive, clock), clock)


def relay_process(tmp_path: Path, openrouter_url: str, policy: str) -> tuple[QPServer, Path]:
    """`server.py` (not yet started) relaying to `openrouter_url` with the server's key, and
    its policy file, holding `policy`."""
    config = tmp_path / "qp.toml"
    config.write_text(policy)
    env = {"QP_CONFIG": str(config), "QP_OPENROUTER_URL": openrouter_url, "OPENROUTER_API_KEY": "k"}
    return QPServer(tmp_path / "qp", env), config


class WriterHold:
    """A write that, once its group runs in the SQLite writer's thread, holds that thread
    until released (then commits): the writes asked for meanwhile wait in the queue."""

    def __init__(self, db: Database):
        self._holding, self._release = threading.Event(), threading.Event()

        async def hold(tx: Transaction) -> None:
            self._holding.set()
            self._release.wait(60)

        self.task = asyncio.ensure_future(db.write(hold))

    async def held(self) -> None:
        """Until the writer's thread is inside the write."""
        assert await asyncio.to_thread(self._holding.wait, 60)

    def release(self) -> None:
        self._release.set()
