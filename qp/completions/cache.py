"""The response cache: completed answers the operator paid for, by the key of the request
that got them, replayed to the same request within its app's TTL.

One process keeps it in memory; processes sharing PostgreSQL keep it in a table there, so
that an answer one of them paid for is replayed by all. Either holds at most `max_bytes`
of answers (the least recently stored go first) and nothing older than the longest TTL in
force. A restart of the one process forgets it; nothing else depends on it, so a
database that fails makes a lookup a miss and a store a no-op, never an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from qp.errors import StorageUnavailable, UnstorableValue
from qp.storage.database import Database, Transaction

log = logging.getLogger("qp.completions.cache")


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """The stream as the client got it, byte for byte, and what upstream charged for it."""

    body: bytes
    cost: float


class ResponseCache(Protocol):
    async def get(self, key: str, ttl: float) -> CachedAnswer | None:
        """The answer stored under `key` less than `ttl` seconds ago, if any."""
        ...

    async def put(
        self, key: str, app: str | None, answer: CachedAnswer, longest_ttl: float
    ) -> None:
        """Store `answer`; let go of what is older than `longest_ttl` or past the bound."""
        ...


class MemoryResponseCache:
    """One process's cache: answers in memory, at most `max_bytes` of them."""

    def __init__(self, max_bytes: int, clock: Callable[[], float]):
        self._max_bytes = max_bytes
        self._clock = clock
        self._answers: OrderedDict[str, tuple[CachedAnswer, float]] = OrderedDict()
        self.bytes_held = 0

    async def get(self, key: str, ttl: float) -> CachedAnswer | None:
        stored = self._answers.get(key)
        if stored is None:
            return None
        answer, stored_at = stored
        if self._clock() - stored_at >= ttl:
            self._drop(key)
            return None
        return answer

    async def put(
        self, key: str, app: str | None, answer: CachedAnswer, longest_ttl: float
    ) -> None:
        if len(answer.body) > self._max_bytes:
            return
        now = self._clock()
        if key in self._answers:
            self._drop(key)
        self._answers[key] = (answer, now)
        self.bytes_held += len(answer.body)
        # Oldest first: past the bound, or older than any TTL in force.
        while self._answers:
            oldest, (_, stored_at) = next(iter(self._answers.items()))
            if self.bytes_held <= self._max_bytes and now - stored_at < longest_ttl:
                break
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        answer, _ = self._answers.pop(key)
        self.bytes_held -= len(answer.body)


GET = "SELECT body, cost, stored_at FROM response_cache WHERE key = ?"
PUT = """
    INSERT INTO response_cache (key, app, body, cost, stored_at, size) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET app = excluded.app, body = excluded.body,
      cost = excluded.cost, stored_at = excluded.stored_at, size = excluded.size
"""
EXPIRED = "DELETE FROM response_cache WHERE stored_at <= ?"
# Newest first, what lies past `max_bytes` in all.
PAST_THE_BOUND = """
    DELETE FROM response_cache WHERE key IN (
      SELECT key FROM (
        SELECT key, SUM(size) OVER (ORDER BY stored_at DESC, key DESC) AS held
        FROM response_cache
      ) AS newest_first WHERE held > ?
    )
"""
# Taken by each store: the bound holds across processes storing at once.
STORE_LOCK = "response-cache"


class SharedResponseCache:
    """The cache processes sharing PostgreSQL share: a table, at most `max_bytes` of it."""

    def __init__(self, db: Database, max_bytes: int, clock: Callable[[], float]):
        self._db = db
        self._max_bytes = max_bytes
        self._clock = clock

    async def get(self, key: str, ttl: float) -> CachedAnswer | None:
        try:
            row = await self._db.fetchone(GET, (key,))
        except StorageUnavailable as err:
            log.warning("response cache not read (a miss): %s", err)
            return None
        if row is None or self._clock() - row[2] >= ttl:
            return None
        return CachedAnswer(bytes(row[0]), row[1])

    async def put(
        self, key: str, app: str | None, answer: CachedAnswer, longest_ttl: float
    ) -> None:
        size = len(answer.body)
        if size > self._max_bytes:
            return
        now = self._clock()

        async def store(tx: Transaction) -> None:
            await tx.lock(STORE_LOCK)
            await tx.execute(PUT, (key, app, answer.body, answer.cost, now, size))
            await tx.execute(EXPIRED, (now - longest_ttl,))
            await tx.execute(PAST_THE_BOUND, (self._max_bytes,))

        try:
            await self._db.write(store, durable=False)
        except (StorageUnavailable, UnstorableValue) as err:
            log.warning("response cache not written: %s", err)


RESPONSE_CACHE = web.AppKey("response_cache", ResponseCache)
