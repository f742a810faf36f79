"""Blob stores: bytes by key (a chat's messages live at `chats/{chatId}/{rev}.json`).

`FileBlobStore` keeps them in a folder (atomic writes: temp file, fsync, rename);
`S3BlobStore` (storage/s3.py) in any S3-compatible bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qp.errors import StorageUnavailable, os_error_reason

# A key is slash-separated segments of safe characters; never `..`, never absolute.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


class StoreNotReady(Exception):
    """The store cannot be used at start-up (missing bucket, bad credentials, unreachable)."""


def check_key(key: str) -> str:
    if not _KEY_PATTERN.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobReader(Protocol):
    """An open blob, read a piece at a time: what it held when opened, whatever happens to
    the key meanwhile."""

    size: int

    async def read(self, nbytes: int) -> bytes:
        """Up to `nbytes`; b"" at the end."""
        ...

    async def close(self) -> None: ...


class BlobStore(Protocol):
    """Bytes by key. Missing keys read as None; any failure raises StorageUnavailable."""

    async def get(self, key: str) -> bytes | None: ...

    async def open_reader(self, key: str) -> BlobReader | None:
        """The blob, open for reading in pieces, or None when missing."""
        ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: list[str]) -> None:
        """Delete every key (missing ones too), in as few requests as the store allows."""
        ...

    async def ping(self) -> None: ...

    async def probe_write(self) -> None:
        """A small write that proves the store takes writes again (StorageUnavailable if not)."""
        ...

    def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        """Every blob whose key starts with `prefix` (a folder, ending in `/`), in its
        subfolders too."""
        ...


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    size: int
    modified: float  # epoch seconds


def shown_key(key: str) -> str:
    """A key as failures name it: its first folder only (a chat's key holds its id, a
    bearer secret that never goes to a log)."""
    return f"{key.split('/', 1)[0]}/..." if "/" in key else key


def os_failure(action: str, key: str, err: OSError) -> StorageUnavailable:
    return StorageUnavailable(
        "Storage", f"{action} {shown_key(key)}: {err.strerror or err}", os_error_reason(err)
    )


class FileBlobStore:
    """Blobs as files under one folder; a key can never name a path outside it.

    The folder itself is never re-created once open: if it vanishes (an unmounted disk),
    writes fail rather than land in whatever is left at its path.
    """

    def __init__(self, root: Path):
        self.root = root.resolve()

    @classmethod
    def open(cls, root: Path) -> FileBlobStore:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreNotReady(f"cannot create blob folder {root}: {err.strerror}") from None
        if not os.access(root, os.W_OK):
            raise StoreNotReady(f"blob folder {root} is not writable")
        return cls(root)

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(check_key(key))
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid blob key {key!r}")
        return path

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise os_failure("read", key, err) from err

    async def open_reader(self, key: str) -> BlobReader | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(FileReader.open, path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise os_failure("read", key, err) from err

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_write_atomically, path, data, self.root)
        except OSError as err:
            raise os_failure("write", key, err) from err

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as err:
            raise os_failure("delete", key, err) from err

    async def delete_many(self, keys: list[str]) -> None:
        paths = [self._path(key) for key in keys]

        def unlink_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(unlink_all)
        except OSError as err:
            raise os_failure("delete", keys[0], err) from err

    async def ping(self) -> None:
        if not await asyncio.to_thread(_writable_folder, self.root):
            raise StorageUnavailable("Storage", f"{self.root} is not a writable folder")

    async def probe_write(self) -> None:
        try:
            await asyncio.to_thread(_probe_folder, self.root)
        except OSError as err:
            raise os_failure("probe", str(self.root), err) from err

    async def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        folder = self._path(prefix.rstrip("/"))

        def scan() -> list[StoredBlob]:
            found = []
            folders = [(folder, prefix)]
            while folders:
                path, key_prefix = folders.pop()
                try:
                    entries = list(os.scandir(path))
                except FileNotFoundError:
                    continue  # removed meanwhile
                for entry in entries:
                    # Temp files of writes in progress start with a dot.
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append((Path(entry.path), f"{key_prefix}{entry.name}/"))
                    elif entry.is_file(follow_symlinks=False):
                        info = entry.stat()
                        key = key_prefix + entry.name
                        found.append(StoredBlob(key, info.st_size, info.st_mtime))
            return found

        try:
            blobs = await asyncio.to_thread(scan)
        except OSError as err:
            raise StorageUnavailable("Storage", f"list {prefix}: {err}") from err
        for blob in blobs:
            yield blob


class FileReader:
    """A blob file, open: a rename over it (a newer write) does not change what it reads."""

    def __init__(self, fd: int):
        self._fd = fd
        self.size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: Path) -> FileReader:
        fd = os.open(path, os.O_RDONLY)
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    async def read(self, nbytes: int) -> bytes:
        try:
            return await asyncio.to_thread(os.read, self._fd, nbytes)
        except OSError as err:
            raise os_failure("read", "an open blob", err) from err

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _writable_folder(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def _probe_folder(root: Path) -> None:
    fd, name = tempfile.mkstemp(dir=root, prefix=".probe-")
    try:
        os.write(fd, b"probe")
    finally:
        os.close(fd)
        os.unlink(name)


def _write_atomically(path: Path, data: bytes, root: Path) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder: never a torn blob."""
    # The key's own folders (chats/ID/) may be new; the store's root must exist already.
    # A folder made here is fsynced into its parent, so a power cut cannot lose it.
    for folder in [*reversed(path.parent.relative_to(root).parents[:-1]), path.parent]:
        folder = root / folder
        if folder == root:
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _fsync_folder(folder.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_store_root(url: str) -> Path:
    return Path(url[len("file://") :])
