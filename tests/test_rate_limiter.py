"""RateLimiter's window arithmetic and blocks, on its own clock: no server, no waiting."""

from __future__ import annotations

import pytest

from qp.protection.rate_limits import BLOCK_SECONDS, RateLimit, RateLimiter, RateRefusal

HOUR_START = 1_800_000_000.0 - 1_800_000_000.0 % 3600  # the first second of some hour


class Clock:
    def __init__(self, now: float = HOUR_START):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def saved() -> dict[str, float]:
    return {}


@pytest.fixture
def limiter(clock: Clock, saved: dict[str, float]) -> RateLimiter:
    async def save_block(client: str, until: float) -> None:
        saved[client] = until

    return RateLimiter({}, save_block, clock=clock)


async def outcomes(limiter: RateLimiter, count: int, limit: RateLimit) -> list[str]:
    """'ok' or the refusal's reason for each of `count` requests of one client."""
    results = []
    for _ in range(count):
        refusal = await limiter.check("client", "chats", limit)
        results.append("ok" if refusal is None else refusal.reason)
    return results


async def test_the_minute_allows_its_count_then_refuses_until_the_next_minute(limiter, clock):
    limit = RateLimit(per_minute=3, per_hour=None)
    clock.now += 10
    assert await outcomes(limiter, 4, limit) == ["ok", "ok", "ok", "minute"]
    clock.now += 49  # still the same minute
    assert await outcomes(limiter, 1, limit) == ["minute"]
    clock.now += 1  # the next minute
    assert await outcomes(limiter, 4, limit) == ["ok", "ok", "ok", "minute"]


async def test_a_new_minute_does_not_reset_the_hours_count(limiter, clock):
    limit = RateLimit(per_minute=3, per_hour=5)
    assert await outcomes(limiter, 3, limit) == ["ok"] * 3
    clock.now += 60
    assert await outcomes(limiter, 3, limit) == ["ok", "ok", "hour"]
    clock.now += 60
    assert await outcomes(limiter, 1, limit) == ["hour"]
    clock.now = HOUR_START + 3600  # the next hour
    assert await outcomes(limiter, 1, limit) == ["ok"]


async def test_the_refusals_message_and_retry_after(limiter):
    minute = RateLimit(per_minute=1, per_hour=None)
    await limiter.check("client", "chats", minute)
    assert await limiter.check("client", "chats", minute) == RateRefusal(
        60, "Rate limit exceeded: 1 requests per minute", "minute"
    )
    hour = RateLimit(per_minute=None, per_hour=1)
    await limiter.check("other", "chats", hour)
    assert await limiter.check("other", "chats", hour) == RateRefusal(
        3600, "Rate limit exceeded: 1 requests per hour", "hour"
    )


async def test_classes_and_clients_are_counted_apart(limiter):
    limit = RateLimit(per_minute=1, per_hour=None)
    assert await limiter.check("client", "chats", limit) is None
    assert await limiter.check("client", "completion", limit) is None
    assert await limiter.check("other", "chats", limit) is None
    assert (await limiter.check("client", "chats", limit)).reason == "minute"


async def test_ten_refusals_within_an_hour_block_for_a_day(limiter, clock, saved):
    limit = RateLimit(per_minute=1, per_hour=None)
    for _ in range(10):
        clock.now += 60
        assert await outcomes(limiter, 2, limit) == ["ok", "minute"]
    blocked_at = clock.now
    assert saved == {"client": blocked_at + BLOCK_SECONDS}
    refusal = await limiter.check("client", "chats", limit)
    assert refusal == RateRefusal(
        BLOCK_SECONDS, "IP blocked due to excessive violations", "blocked"
    )
    # A block holds on routes whose class has no limit too, and ends after a day.
    assert (await limiter.check("client", "admin", RateLimit(None, None))).reason == "blocked"
    clock.now = blocked_at + BLOCK_SECONDS
    assert await limiter.check("client", "chats", limit) is None


async def test_ten_refusals_spread_over_more_than_an_hour_do_not_block(limiter, clock, saved):
    limit = RateLimit(per_minute=1, per_hour=None)
    for _ in range(10):
        assert await outcomes(limiter, 2, limit) == ["ok", "minute"]
        clock.now += 401  # the tenth refusal comes 3,609 s after the first
    assert saved == {}
    assert limiter.blocked("client") is None
    # An eleventh a minute after the tenth makes ten within 3,268 s: blocked.
    clock.now += 60 - 401
    assert await outcomes(limiter, 2, limit) == ["ok", "minute"]
    assert list(saved) == ["client"]


async def test_off_counts_nothing_and_never_refuses(limiter, saved):
    off = RateLimit.parse("off")
    assert await outcomes(limiter, 100, off) == ["ok"] * 100
    assert limiter.tracked == 0 and saved == {}


async def test_past_max_clients_the_least_recently_seen_are_forgotten(clock):
    async def save_block(client: str, until: float) -> None:
        pass

    limiter = RateLimiter({}, save_block, clock=clock, max_clients=3)
    limit = RateLimit(per_minute=1, per_hour=None)
    for client in ("a", "b", "c", "d"):
        assert await limiter.check(client, "chats", limit) is None
    assert (limiter.tracked, limiter.forgotten) == (3, 1)
    # "a" was forgotten, so it starts afresh; "d" is still counted.
    assert await limiter.check("a", "chats", limit) is None
    assert (await limiter.check("d", "chats", limit)).reason == "minute"


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("10/minute,100/hour", RateLimit(10, 100)),
        (" 5 / hour ", RateLimit(None, 5)),
        ("OFF", RateLimit(None, None)),
    ],
)
def test_limits_parse_and_print_back(text, limit):
    assert RateLimit.parse(text) == limit
    assert RateLimit.parse(str(limit)) == limit


@pytest.mark.parametrize("text", ["", "10", "10/day", "1/minute,2/minute", "-1/minute"])
def test_malformed_limits_are_refused(text):
    with pytest.raises(ValueError, match="is not N/minute,M/hour or off"):
        RateLimit.parse(text)
