"""FileBlobStore on its own: keys can never name a path outside its folder."""

from __future__ import annotations

import pytest

from qp.storage.blobs import FileBlobStore

ESCAPING_KEYS = [
    "../outside.json",
    "chats/../../outside.json",
    "/etc/passwd",
    "chats//x.json",
    "chats/./x.json",
    "chats/..",
    "chats\\..\\x",
    "",
    "chats/x\x00.json",
]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
async def test_keys_that_could_escape_are_refused(tmp_path, key):
    store = FileBlobStore.open(tmp_path / "blobs")
    for operation in (store.get(key), store.put(key, b"[]"), store.delete(key)):
        with pytest.raises(ValueError):
            await operation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]


async def test_put_replaces_whole_and_leaves_no_temp_files(tmp_path):
    store = FileBlobStore.open(tmp_path / "blobs")
    await store.put("chats/a.json", b"[1]")
    await store.put("chats/a.json", b"[1,2]")
    assert await store.get("chats/a.json") == b"[1,2]"
    assert [p.name for p in (tmp_path / "blobs" / "chats").iterdir()] == ["a.json"]


async def test_missing_key_reads_as_none_and_deletes_quietly(tmp_path):
    store = FileBlobStore.open(tmp_path / "blobs")
    assert await store.get("chats/none.json") is None
    await store.delete("chats/none.json")
