"""Completions the response cache is on for (an app's TTL, the server's or the app's key).

- **A hit** (a completed answer stored under the request's key within the TTL) is replayed
  at once, byte for byte, with `X-QP-Cache: hit`; no reservation, no cost lookup. Its
  ledger row costs 0 (`cost_source` cache, outcome cached) and names what it saved.
- **A miss** becomes a flight, or joins the one in flight for the same key: one upstream
  request, relayed by a task of its own to every client following it, each from the first
  byte (the flight keeps its first `entry_bytes`; past them no one joins, and the flight is
  not stored). A client that leaves stops following; the last one leaving cancels the
  flight, which aborts upstream. Upstream is read on while some follower keeps up: a slow
  follower alone is held back as the relay holds a slow client, and one more than twice
  `entry_bytes` behind others that keep up is cut (its stream ends short), so a slow
  reader holds neither memory nor the others back.
- The flight's first client pays (`X-QP-Cache: miss`): its reservation, its ledger row,
  exactly as without the cache; the followers' rows are like hits (one that got no stream,
  because it left first or the flight failed, has a row costing nothing). A flight refused before
  it went upstream (a budget of the first client's) refuses only that client: the others
  start or join another.
- A flight that completed (a finish reason, no error, its cost in the usage seen) within
  `entry_bytes` is stored before its followers' streams end (so a client that has the
  whole answer gets a hit next, from any process); joining it before its key leaves the
  registry is a hit too.

Each process has its own flights: on several processes, each sends at most one request
upstream for the same miss at once, and the stored answer is shared through the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from qp.completions.attempts import Payload, first_answer
from qp.completions.cache import RESPONSE_CACHE, CachedAnswer
from qp.completions.relay import (
    STREAM_HEADERS,
    UPSTREAM,
    abort_stream,
    read_chunk,
    recording_the_end,
)
from qp.completions.usage import UsageScanner
from qp.errors import STORAGE_UNAVAILABLE, ApiError, StorageUnavailable
from qp.metrics import METRICS
from qp.policy.policy import Policy
from qp.spend.record import CompletionRecord
from qp.spend.spending import SPEND

log = logging.getLogger("qp.completions.flights")
T = TypeVar("T")

HIT_HEADERS = {**STREAM_HEADERS, "X-QP-Cache": "hit"}
MISS_HEADERS = STREAM_HEADERS


class _HeldBytes:
    """What all flights keep and their followers have yet to write, against one bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class _Follower:
    """One client's place in a flight: the chunks it has yet to write."""

    def __init__(self, chunks: list[bytes], size: int):
        self.chunks: deque[bytes] = deque(chunks)
        self.behind = size
        self.cut = False
        self.woken = asyncio.Event()


@dataclass
class _Failure:
    """Why a flight ended before its stream: the answer each of its clients gets."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    # Refused before it went upstream (the first client's budget, its storage): not the
    # others' answer.
    before_upstream: bool

    @classmethod
    def of(cls, err: Exception, before_upstream: bool) -> _Failure:
        """The answer the relay would have given for `err`: an ApiError's own; a storage
        failure the contract's 503 (as the error middleware answers it); else a 500."""
        if isinstance(err, ApiError):
            return cls(err.status, err.body, err.headers or {}, before_upstream)
        if isinstance(err, StorageUnavailable):
            log.error("completion: %s", err)
            return cls(503, STORAGE_UNAVAILABLE, {"Retry-After": "5"}, before_upstream)
        log.error("completion: unexpected %s in a response-cache flight", type(err).__name__)
        return cls(500, {"error": "Internal server error"}, {}, before_upstream)

    def error(self) -> ApiError:
        """A fresh error for one client (each raises its own)."""
        extra = {name: value for name, value in self.body.items() if name != "error"}
        return ApiError(self.status, str(self.body["error"]), dict(self.headers), **extra)


@dataclass(eq=False)
class Flight:
    key: str
    entry_bytes: int
    held: _HeldBytes
    # The first client's record: the paid completion's ledger row.
    record: CompletionRecord
    # The chunks so far while they fit `entry_bytes` (and the bound of all that is held);
    # None past it: no one joins then, and it is not stored.
    kept: list[bytes] | None = field(default_factory=list)
    kept_bytes: int = 0
    followers: set[_Follower] = field(default_factory=set)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    failure: _Failure | None = None
    # Upstream answered 2xx: the stream is on. Being cancelled (its last client left): no
    # one joins it.
    streaming: bool = False
    closing: bool = False
    # How the upstream stream ended (None: still going), and what it cost.
    outcome: str | None = None
    cost: float | None = None
    task: asyncio.Task[None] | None = None
    # Set when a follower wrote a chunk or left: the flight may read on.
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def follow(self) -> _Follower | None:
        """A follower from the first byte; None when what it would hold has no room."""
        assert self.kept is not None
        if not self.held.take(self.kept_bytes):
            return None
        follower = _Follower(self.kept, self.kept_bytes)
        self.followers.add(follower)
        if self.outcome is not None:
            follower.woken.set()
        return follower

    def publish(self, chunk: bytes) -> None:
        size = len(chunk)
        if self.kept is not None:
            if self.kept_bytes + size <= self.entry_bytes and self.held.take(size):
                self.kept.append(chunk)
                self.kept_bytes += size
            else:
                self.let_go()
        for follower in self.followers:
            if follower.cut:
                continue
            if self.held.take(size):
                follower.chunks.append(chunk)
                follower.behind += size
            else:
                self._cut(follower)  # all flights hold their bound: its stream ends short
            follower.woken.set()

    async def room(self) -> None:
        """Before the next read upstream: wait while every follower is more than two entries
        behind (one slow client alone is held back as the relay would hold it, by not
        reading on); when some are and others are not, cut those behind (their streams end
        short), so that no reader holds the others back or memory up."""
        limit = 2 * self.entry_bytes
        while True:
            live = [follower for follower in self.followers if not follower.cut]
            behind = [follower for follower in live if follower.behind >= limit]
            if len(behind) < len(live) or not live:
                for follower in behind:
                    self._cut(follower)
                    follower.woken.set()
                return
            self.drained.clear()
            await self.drained.wait()

    def let_go(self) -> None:
        """Keep no more: no one joins from here, and it is not stored."""
        self.held.give(self.kept_bytes)
        self.kept, self.kept_bytes = None, 0

    def _cut(self, follower: _Follower) -> None:
        follower.cut = True
        follower.chunks.clear()
        self.held.give(follower.behind)
        follower.behind = 0
        self.drained.set()

    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.answered.set()
            for follower in self.followers:
                follower.woken.set()

    async def next_chunk(self, follower: _Follower) -> bytes | None:
        """The follower's next chunk; None once there is none left to write."""
        while not follower.chunks:
            if follower.cut or self.outcome is not None:
                return None
            follower.woken.clear()
            await follower.woken.wait()
        chunk = follower.chunks.popleft()
        follower.behind -= len(chunk)
        self.held.give(len(chunk))
        self.drained.set()
        return chunk

    async def leave(self, follower: _Follower) -> None:
        """The follower stops following; the last one leaving a flight still streaming
        cancels it (upstream is aborted) and waits for it to record how it ended."""
        self.followers.discard(follower)
        self._cut(follower)
        task = self.task
        if not self.followers and task is not None and not task.done() and self.outcome is None:
            self.closing = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})


class Flights:
    """The flights in progress in this process, by key, and what they hold (at most
    `max_bytes`, QP_RESPONSE_CACHE_MB: past it a flight keeps no more, a follower that would
    add to it is cut, and a client that cannot join goes upstream on its own)."""

    def __init__(self, max_bytes: int) -> None:
        self.by_key: dict[str, Flight] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.held = _HeldBytes(max_bytes)

    async def close(self) -> None:
        """Cancel the flights still running and wait for each to record how it ended."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)


FLIGHTS = web.AppKey("flights", Flights)


async def cached_completion(
    request: web.Request,
    policy: Policy,
    payload: Payload,
    record: CompletionRecord,
    estimate: float,
    key: str,
) -> web.StreamResponse:
    """The answer of a completion the cache is on for: a hit, a flight joined, or a flight
    of its own (see the module's docstring)."""
    app = request.app
    metrics = app[METRICS]
    ttl = policy.cache_ttl_of(record.app)
    stored = await _within(app[RESPONSE_CACHE].get(key, ttl), "read (a miss)")
    if stored is not None:
        metrics.cache_hits_of["stored"].inc()
        return await _replay(request, stored, record)
    flights = app[FLIGHTS]
    for _ in range(MAX_FLIGHTS_TRIED):
        flight = flights.by_key.get(key)
        # Joined from its first byte, while it streams or once it completed; not one past
        # the bound, one being cancelled, or one that ended otherwise.
        leading = (
            flight is None
            or flight.kept is None
            or flight.closing
            or flight.outcome not in (None, "completed")
        )
        follower = None if leading or flight is None else flight.follow()
        if follower is None:
            leading = True
            flight = _start(request, policy, payload, record, estimate, key)
            follower = flight.follow()
        assert flight is not None and follower is not None  # an empty start always has room
        try:
            try:
                await flight.answered.wait()
            except asyncio.CancelledError:
                if not leading:  # it left before the answer: its row says so
                    _record_follower(request, record, 0, _left(request))
                elif flight.outcome is None:
                    flight.record.client_left = True  # the first client left; others wait on
                raise
            failure = flight.failure
            if failure is not None:
                if leading or not failure.before_upstream:
                    if not leading:  # the first client's failure upstream is its too
                        _record_follower(request, record, failure.status, flight.record.outcome)
                    raise failure.error()
                continue  # the first client was refused: start or join another
            if not flight.streaming:
                continue  # it ended before upstream answered (its clients left): another
            if leading:
                metrics.cache_misses.inc()
                return await _follow(request, flight, follower, MISS_HEADERS, None)
            metrics.cache_hits_of["in_flight"].inc()
            return await _follow(request, flight, follower, HIT_HEADERS, record)
        finally:
            await flight.leave(follower)
    raise ApiError(502, "Bad Gateway", message="Could not connect to the completion service")


# Flights one request starts or joins at most: each that ends before its answer (its
# clients left, or its first client's budget refused it) sends it to the next.
MAX_FLIGHTS_TRIED = 3
# How long a lookup or a store in the cache may take (a database that hangs): then a miss,
# or not stored.
CACHE_SECONDS = 1.0


def _left(request: web.Request) -> str:
    """How a client's completion ended when it went away: or the server stopped."""
    return "shutdown" if request.app[UPSTREAM].shutting_down.is_set() else "client_left"


def _start(
    request: web.Request,
    policy: Policy,
    payload: Payload,
    record: CompletionRecord,
    estimate: float,
    key: str,
) -> Flight:
    app = request.app
    flights = app[FLIGHTS]
    flight = Flight(key, app[RESPONSE_CACHE_ENTRY_BYTES], flights.held, record)
    flights.by_key[key] = flight
    task = asyncio.create_task(_fly(request, flight, policy, payload, record, estimate))
    flight.task = task
    flights.tasks.add(task)
    task.add_done_callback(flights.tasks.discard)
    return flight


async def _fly(
    request: web.Request,
    flight: Flight,
    policy: Policy,
    payload: Payload,
    record: CompletionRecord,
    estimate: float,
) -> None:
    """The flight's one upstream request, paid and recorded as the first client's, relayed
    to every follower; then stored if it completed within the entry bound."""
    app = request.app
    flights = app[FLIGHTS]
    upstream = app[UPSTREAM]
    went_upstream = False
    try:
        async with app[SPEND].completion(policy, record, estimate):
            went_upstream = True
            # Cancelled when every follower left, or the server's shutdown timeout ended:
            # upstream is aborted, as the relay's own would be.
            with (
                recording_the_end(record, upstream),
                app[METRICS].open_streams.track_inprogress(),
            ):
                answer, _ = await first_answer(request, upstream.session, policy, payload, record)
                async with answer:
                    record.status = 200
                    flight.streaming = True
                    flight.answered.set()
                    await _relay(answer, flight, record)
                # Stored before the followers' streams end: once a client has the whole
                # answer, the next identical request, on any process, is a hit.
                await _store(request, flight, policy, record)
                flight.end(record.outcome)
    except Exception as err:
        # Its clients are answered as the relay's would be: an ApiError as it says, a storage
        # failure the contract's 503 (the error middleware, for each of them).
        flight.failure = _Failure.of(err, not went_upstream)
        flight.end("refused")
    finally:
        flight.end(record.outcome)
        if flights.by_key.get(flight.key) is flight:
            del flights.by_key[flight.key]
        if flight.kept is not None:
            flight.let_go()


async def _relay(answer: aiohttp.ClientResponse, flight: Flight, record: CompletionRecord) -> None:
    usage = UsageScanner()
    try:
        while True:
            chunk = await read_chunk(answer, record)
            if chunk is None:
                break
            if not chunk:
                record.outcome = "completed"
                break
            flight.publish(chunk)
            usage.feed(chunk)
            await flight.room()
    finally:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cost = flight.cost = usage.cost
        record.generation_id = usage.generation_id


async def _store(
    request: web.Request, flight: Flight, policy: Policy, record: CompletionRecord
) -> None:
    """Store the answer if it is whole (completed, a finish reason, no error, its cost) and
    from the model asked for (a fallback's answer is not replayed for the TTL)."""
    kept = flight.kept
    if record.outcome != "completed" or kept is None or flight.cost is None:
        return
    if record.answered_model != record.model:
        return
    body = b"".join(kept)
    if not _FINISHED.search(body) or _ERROR.search(body):
        return
    app = request.app
    answer = CachedAnswer(body, flight.cost)
    put = app[RESPONSE_CACHE].put(flight.key, record.app, answer, policy.longest_cache_ttl)
    if await _within(_done(put), "written (yet)"):
        app[METRICS].cache_stored_bytes.inc(len(body))


async def _done(step: Coroutine[Any, Any, None]) -> bool:
    await step
    return True


async def _within(step: Coroutine[Any, Any, T], what: str) -> T | None:
    """`step`'s result if it is done within CACHE_SECONDS; else None, and it goes on alone
    (a hung database does not let go of a cancelled query at once: waiting for that would
    hold the completion up as long)."""
    task = asyncio.ensure_future(step)
    task.add_done_callback(_quietly)
    done, _ = await asyncio.wait({task}, timeout=CACHE_SECONDS)
    if task not in done:
        log.warning("response cache not %s within %g s", what, CACHE_SECONDS)
        return None
    return task.result()


def _quietly(task: asyncio.Future[Any]) -> None:
    """A cache step that outlived its wait: its end is nobody's business (the cache logs
    its own failures)."""
    if not task.cancelled():
        task.exception()


# A finish reason (a string, not null), and an error event or key, in the stream's JSON.
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_ERROR = re.compile(rb'"error"\s*:|"finish_reason"\s*:\s*"error"')


async def _follow(
    request: web.Request,
    flight: Flight,
    follower: _Follower,
    headers: dict[str, str],
    record: CompletionRecord | None,
) -> web.StreamResponse:
    """Write the flight's chunks to this client as they come; `record`: a follower's own
    (a hit), else the first client's, which the flight records."""
    response = web.StreamResponse(status=200, headers=headers)
    written = 0
    outcome: str | None = None  # None: it went away (or the server stopped) first
    try:
        try:
            await response.prepare(request)
            while (chunk := await flight.next_chunk(follower)) is not None:
                await response.write(chunk)
                written += len(chunk)
            if flight.outcome == "completed" and not follower.cut:
                await response.write_eof()
                outcome = "cached"
            else:
                outcome = "cut_behind" if follower.cut else flight.outcome or "upstream_died"
                abort_stream(request)
        except ConnectionError:
            if follower.cut:
                outcome = "cut_behind"  # cut while its write was blocked
        return response
    finally:
        ended = outcome or _left(request)
        if record is not None:
            request.app[METRICS].cache_bytes_replayed.inc(written)
            _record_hit(request, record, flight.cost, ended)
        elif outcome is None and flight.outcome is None:
            flight.record.client_left = True  # the first client left; others read on


async def _replay(
    request: web.Request, stored: CachedAnswer, record: CompletionRecord
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=HIT_HEADERS)
    outcome: str | None = None  # None: it went away (or the server stopped) first
    try:
        try:
            await response.prepare(request)
            await response.write(stored.body)
            await response.write_eof()
            outcome = "cached"
        except ConnectionError:
            pass
        request.app[METRICS].cache_bytes_replayed.inc(len(stored.body))
        return response
    finally:
        _record_hit(request, record, stored.cost, outcome or _left(request))


def _record_hit(
    request: web.Request, record: CompletionRecord, saved: float | None, outcome: str
) -> None:
    """A follower's or a replay's ledger row: outcome cached when the client got the whole
    answer (client_left, cut_behind or the flight's own otherwise), cost 0, what it saved."""
    record.status, record.outcome, record.saved_cost = 200, outcome, saved
    record.client_left = outcome == "client_left"
    request.app[SPEND].served_from_cache(record)


def _record_follower(
    request: web.Request, record: CompletionRecord, status: int, outcome: str
) -> None:
    """A follower's row when it got no stream (it left first, or the flight failed):
    nothing billed, nothing saved."""
    record.status, record.outcome = status, outcome
    record.client_left = outcome == "client_left"
    request.app[SPEND].nothing_billed(record)


RESPONSE_CACHE_ENTRY_BYTES = web.AppKey("response_cache_entry_bytes", int)
