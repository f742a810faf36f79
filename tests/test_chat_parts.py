"""ChatCache and ChatLocks on their own."""

from __future__ import annotations

import asyncio

from qp.chats.cache import ChatCache
from qp.chats.locks import ChatLocks


def test_the_cache_serves_what_was_put_and_forgets_what_was_discarded():
    cache = ChatCache(1600)
    cache.put("a", b"x" * 50)
    assert cache.get("a") == b"x" * 50
    cache.discard("a")
    assert cache.get("a") is None
    cache.discard("never-there")
    cache.put("a", b"1" * 10)
    cache.put("a", b"2" * 20)  # a second put replaces the first
    assert cache.get("a") == b"2" * 20


def test_past_its_budget_the_cache_drops_the_least_recently_used():
    cache = ChatCache(1600)  # entries of at most 100 bytes
    for name in "abcdefghijklmnop":  # 16 entries of 100 bytes: exactly full
        cache.put(name, name.encode() * 100)
    assert cache.get("a") == b"a" * 100  # now the most recently used
    cache.put("q", b"q" * 100)
    assert cache.get("b") is None  # the least recently used went
    assert [cache.get(name) is not None for name in "acdefghijklmnopq"] == [True] * 16


def test_an_entry_over_a_sixteenth_of_the_budget_is_not_kept():
    cache = ChatCache(1600)
    cache.put("small", b"s")
    cache.put("big", b"b" * 101)
    assert cache.get("big") is None
    assert cache.get("small") == b"s"


def test_clear_empties_the_cache_and_its_budget():
    cache = ChatCache(1600)
    for name in "abcdefghijklmnop":
        cache.put(name, b"x" * 100)
    cache.clear()
    assert cache.get("a") is None
    for name in "ABCDEFGHIJKLMNOP":  # the whole budget is free again
        cache.put(name, b"y" * 100)
    assert all(cache.get(name) for name in "ABCDEFGHIJKLMNOP")


async def test_a_writer_waits_for_readers_and_readers_for_a_writer():
    locks = ChatLocks()
    events: list[str] = []
    reading = asyncio.Event()
    release_reader = asyncio.Event()

    async def reader(name: str) -> None:
        async with locks.reading("chat"):
            events.append(f"{name} reads")
            reading.set()
            await release_reader.wait()
            events.append(f"{name} done")

    async def writer() -> None:
        await reading.wait()
        async with locks.writing("chat"):
            events.append("write")

    async def late_reader() -> None:
        await asyncio.sleep(0.01)  # the writer is waiting by now
        async with locks.reading("chat"):
            events.append("late reads")

    tasks = [asyncio.create_task(c) for c in (reader("r1"), writer(), late_reader())]
    await asyncio.sleep(0.05)
    assert events == ["r1 reads"]  # the writer waits for r1; the late reader for the writer
    release_reader.set()
    await asyncio.gather(*tasks)
    assert events == ["r1 reads", "r1 done", "write", "late reads"]


async def test_locks_of_different_chats_do_not_wait_for_each_other():
    locks = ChatLocks()
    async with locks.writing("one"):
        async with asyncio.timeout(1):
            async with locks.writing("two"), locks.reading("three"):
                pass


async def test_readers_share_a_chat():
    locks = ChatLocks()
    async with locks.reading("chat"):
        async with asyncio.timeout(1):
            async with locks.reading("chat"):
                pass


async def test_reading_all_holds_every_chat_against_writers():
    locks = ChatLocks()
    wrote: list[str] = []

    async def write(chat_id: str) -> None:
        async with locks.writing(chat_id):
            wrote.append(chat_id)

    async with locks.reading_all(["b", "a", "b"]):
        tasks = [asyncio.create_task(write(c)) for c in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        assert wrote == ["c"]
    await asyncio.gather(*tasks)
    assert sorted(wrote) == ["a", "b", "c"]


async def test_a_lock_is_forgotten_once_nobody_holds_or_waits_for_it():
    locks = ChatLocks()
    for n in range(1000):
        async with locks.writing(f"chat-{n}"):
            pass
    async with locks.reading("x"), locks.reading("x"):
        pass
        assert locks.in_use == 1
    assert locks.in_use == 0
