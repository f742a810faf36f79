"""ChatCache and the chats' blob keys on their own."""

from __future__ import annotations

from qp.chats.cache import REMEMBERED_DROPS, ChatCache
from qp.chats.model import blob_key, new_rev, parse_blob_key


def put(cache: ChatCache, chat_id: str, rendered: bytes, version: str = "v1") -> None:
    cache.put(chat_id, rendered, version, cache.ticket())


def rendered(cache: ChatCache, chat_id: str) -> bytes | None:
    entry = cache.get(chat_id)
    return entry[0] if entry is not None else None


def test_the_cache_serves_what_was_put_and_forgets_what_was_discarded():
    cache = ChatCache(1600)
    put(cache, "a", b"x" * 50)
    assert cache.get("a") == (b"x" * 50, "v1")
    cache.discard("a")
    assert cache.get("a") is None
    cache.discard("never-there")
    put(cache, "a", b"1" * 10)
    put(cache, "a", b"2" * 20, "v2")  # a second put replaces the first
    assert cache.get("a") == (b"2" * 20, "v2")


def test_past_its_budget_the_cache_drops_the_least_recently_used():
    cache = ChatCache(1600)  # entries of at most 100 bytes
    for name in "abcdefghijklmnop":  # 16 entries of 100 bytes: exactly full
        put(cache, name, name.encode() * 100)
    assert rendered(cache, "a") == b"a" * 100  # now the most recently used
    put(cache, "q", b"q" * 100)
    assert cache.get("b") is None  # the least recently used went
    assert [cache.get(name) is not None for name in "acdefghijklmnopq"] == [True] * 16


def test_an_entry_over_a_sixteenth_of_the_budget_is_not_kept():
    cache = ChatCache(1600)
    put(cache, "small", b"s")
    put(cache, "big", b"b" * 101)
    assert cache.get("big") is None
    assert rendered(cache, "small") == b"s"


def test_clear_empties_the_cache_and_its_budget():
    cache = ChatCache(1600)
    for name in "abcdefghijklmnop":
        put(cache, name, b"x" * 100)
    cache.clear()
    assert cache.get("a") is None
    for name in "ABCDEFGHIJKLMNOP":  # the whole budget is free again
        put(cache, name, b"y" * 100)
    assert all(cache.get(name) for name in "ABCDEFGHIJKLMNOP")


def test_a_read_begun_before_its_chat_was_dropped_cannot_cache_what_it_read():
    cache = ChatCache(1600)
    ticket = cache.ticket()  # a read takes the row (version 1) ...
    cache.discard("a")  # ... a write commits version 2 and drops the chat ...
    cache.put("a", b"old", "v1", ticket)  # ... and the read brings version 1 back
    assert cache.get("a") is None
    cache.put("a", b"new", "v2", cache.ticket())
    assert cache.get("a") == (b"new", "v2")


def test_a_drop_of_another_chat_does_not_stop_a_read_caching():
    cache = ChatCache(1600)
    ticket = cache.ticket()
    cache.discard("b")
    cache.put("a", b"x", "v1", ticket)
    assert cache.get("a") == (b"x", "v1")


def test_a_read_older_than_every_drop_remembered_is_not_cached():
    cache = ChatCache(1600)
    ticket = cache.ticket()
    cache.discard("a")
    for number in range(REMEMBERED_DROPS):  # the drop of "a" is forgotten
        cache.discard(f"other-{number}")
    cache.put("a", b"old", "v1", ticket)
    assert cache.get("a") is None


def test_a_read_begun_before_a_clear_cannot_cache_what_it_read():
    cache = ChatCache(1600)
    ticket = cache.ticket()
    cache.clear()
    cache.put("a", b"old", "v1", ticket)
    assert cache.get("a") is None


def test_each_write_has_a_key_of_its_own_and_the_workers_chats_keep_theirs():
    rev = new_rev()
    assert len(rev) == 16 and rev != new_rev()
    assert blob_key("abc", rev) == f"chats/abc/{rev}.json"
    assert blob_key("abc", None) == blob_key("abc", "") == "chats/abc.json"
    assert parse_blob_key(f"chats/abc/{rev}.json") == ("abc", rev)
    assert parse_blob_key("chats/abc.json") == ("abc", "")
    assert parse_blob_key("chats/../x.json") is None
    assert parse_blob_key("other/abc.json") is None
