"""Blob stores: where a chat's messages array lives, under the key `chats/{chatId}.json`.

`FileBlobStore` keeps them in a folder (atomic writes: temp file, fsync, rename);
`S3BlobStore` in any S3-compatible bucket (Cloudflare R2, SeaweedFS, MinIO, AWS) through
one aiobotocore client for the life of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from qp.errors import FULL, READ_ONLY, UNAVAILABLE, StorageUnavailable

# A key is slash-separated segments of safe characters; never `..`, never absolute.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


class StoreNotReady(Exception):
    """The store cannot be used at start-up (missing bucket, bad credentials, unreachable)."""


def chat_key(chat_id: str) -> str:
    return f"chats/{chat_id}.json"


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

    async def ping(self) -> None: ...

    async def probe_write(self) -> None:
        """A small write that proves the store takes writes again (StorageUnavailable if not)."""
        ...

    def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        """Every blob whose key starts with `prefix` (a folder, ending in `/`)."""
        ...


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    size: int
    modified: float  # epoch seconds


def _os_failure(action: str, key: str, err: OSError) -> StorageUnavailable:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = FULL
    elif err.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
        reason = READ_ONLY
    else:
        reason = UNAVAILABLE
    return StorageUnavailable("Storage", f"{action} {key}: {err.strerror or err}", reason)


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
            raise _os_failure("read", key, err) from err

    async def open_reader(self, key: str) -> BlobReader | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_FileReader.open, path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _os_failure("read", key, err) from err

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as err:
            raise _os_failure("write", key, err) from err

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as err:
            raise _os_failure("delete", key, err) from err

    async def ping(self) -> None:
        if not await asyncio.to_thread(_writable_folder, self.root):
            raise StorageUnavailable("Storage", f"{self.root} is not a writable folder")

    async def probe_write(self) -> None:
        try:
            await asyncio.to_thread(_probe_folder, self.root)
        except OSError as err:
            raise _os_failure("probe", str(self.root), err) from err

    async def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        folder = self._path(prefix.rstrip("/"))

        def scan() -> list[StoredBlob]:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                return []
            found = []
            for entry in entries:
                # Temp files of writes in progress start with a dot.
                if entry.is_file() and not entry.name.startswith("."):
                    stat = entry.stat()
                    found.append(StoredBlob(prefix + entry.name, stat.st_size, stat.st_mtime))
            return found

        try:
            blobs = await asyncio.to_thread(scan)
        except OSError as err:
            raise StorageUnavailable("Storage", f"list {prefix}: {err}") from err
        for blob in blobs:
            yield blob


class _FileReader:
    """A blob file, open: a rename over it (a newer write) does not change what it reads."""

    def __init__(self, fd: int):
        self._fd = fd
        self.size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: Path) -> _FileReader:
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
            raise _os_failure("read", "an open blob", err) from err

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


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder: never a torn blob."""
    # The key's own folder (chats/) may be new; the store's root must exist already.
    path.parent.mkdir(exist_ok=True)
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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# What a request to S3 can fail with when the store is down, slow or refusing.
_S3_FAILURES = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)


DEFAULT_S3_TIMEOUT = 30.0
SPOOL_CHUNK = 256 * 1024


def _s3_failure(action: str, key: str, err: Exception) -> StorageUnavailable:
    if isinstance(err, TimeoutError):
        return StorageUnavailable("Storage", f"{action} {key}: no answer in time")
    reason = UNAVAILABLE
    if isinstance(err, botocore.exceptions.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.response.get("Error", {}).get("Code")
        # MinIO and others say so when their disks are full.
        if status == 507 or code in ("XMinioStorageFull", "InsufficientStorage"):
            reason = FULL
    return StorageUnavailable("Storage", f"{action} {key}: {err!r}", reason)


class S3BlobStore:
    """Blobs in an S3-compatible bucket, under an optional key prefix.

    Every call has a deadline (`timeout`, QP_S3_TIMEOUT): a store that accepts connections
    and never answers costs a request that long at most, never a chat's lock forever.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        timeout: float = DEFAULT_S3_TIMEOUT,
        spool_dir: Path | None = None,
    ):
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.timeout = timeout
        # Where objects opened for reading are downloaded to (None: the system's temp dir).
        self.spool_dir = spool_dir

    @classmethod
    async def open(
        cls,
        url: str,
        endpoint_url: str | None,
        region: str | None,
        exit_stack: AsyncExitStack,
        profile: str | None = None,
        call_timeout: float = DEFAULT_S3_TIMEOUT,
    ) -> S3BlobStore:
        """Create the client (closed by `exit_stack`) and check the bucket answers.
        `profile` picks credentials from ~/.aws (botocore's named profiles)."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        config = AioConfig(
            # A store that is down should answer 503 quickly, not after minutes of retries.
            connect_timeout=min(3.0, call_timeout),
            read_timeout=call_timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=64,
            # Path-style works on R2, SeaweedFS and MinIO alike; AWS keeps its default.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Newer botocore checksums everything by default; several S3-compatibles refuse it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = get_session()
        if profile:
            session.set_config_variable("profile", profile)
        client = await exit_stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
            )
        )
        store = cls(client, bucket, prefix.strip("/"), call_timeout)
        await store._check_bucket(endpoint_url)
        return store

    async def _check_bucket(self, endpoint_url: str | None) -> None:
        where = endpoint_url or "AWS S3"
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError:
            raise StoreNotReady(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except botocore.exceptions.ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise StoreNotReady(f"bucket {self.bucket!r} does not exist at {where}") from None
            if status in (401, 403):
                raise StoreNotReady(
                    f"access to bucket {self.bucket!r} at {where} denied:"
                    " check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            raise StoreNotReady(f"bucket {self.bucket!r} at {where}: {err}") from None
        except TimeoutError:
            raise StoreNotReady(f"S3 at {where} did not answer within {self.timeout:g} s") from None
        except _S3_FAILURES as err:
            raise StoreNotReady(f"cannot reach S3 at {where}: {err}") from None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def get(self, key: str) -> bytes | None:
        pieces: list[bytes] = []

        async def keep(piece: bytes) -> None:
            pieces.append(piece)

        return b"".join(pieces) if await self._fetch(key, keep) else None

    async def open_reader(self, key: str) -> BlobReader | None:
        """The object, downloaded at the store's pace into a temporary file first: a client
        reading slowly then holds a file, not one of the store's connections."""
        spool = await asyncio.to_thread(tempfile.TemporaryFile, dir=self.spool_dir)
        try:

            async def spill(piece: bytes) -> None:
                await asyncio.to_thread(spool.write, piece)

            if not await self._fetch(key, spill):
                return None
            await asyncio.to_thread(spool.seek, 0)
            return _FileReader(os.dup(spool.fileno()))
        except OSError as err:
            raise _os_failure("spool", key, err) from err
        finally:
            spool.close()

    async def _fetch(self, key: str, take: Callable[[bytes], Awaitable[None]]) -> bool:
        """Hand the object's bytes to `take` piece by piece, within the deadline; False when
        there is no such object."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                async with response["Body"] as stream:
                    while piece := await stream.read(SPOOL_CHUNK):
                        await take(piece)
            return True
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise _s3_failure("get", key, err) from err
        except _S3_FAILURES as err:
            raise _s3_failure("get", key, err) from err

    async def put(self, key: str, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    ContentType="application/json",
                )
        except _S3_FAILURES as err:
            raise _s3_failure("put", key, err) from err

    async def delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _S3_FAILURES as err:
            raise _s3_failure("delete", key, err) from err

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.head_bucket(Bucket=self.bucket)
        except _S3_FAILURES as err:
            raise _s3_failure("head", "bucket", err) from err

    async def probe_write(self) -> None:
        # Writing a probe object into the operator's bucket is not worth it: an S3 store
        # that answers takes writes.
        await self.ping()

    async def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        skip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full_prefix).__aiter__()
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    page = await pages.__anext__()
            except StopAsyncIteration:
                return
            except _S3_FAILURES as err:
                raise _s3_failure("list", prefix, err) from err
            for item in page.get("Contents", []):
                yield StoredBlob(item["Key"][skip:], item["Size"], item["LastModified"].timestamp())


async def open_blob_store(
    url: str,
    endpoint_url: str | None,
    region: str | None,
    exit_stack: AsyncExitStack,
    profile: str | None = None,
    s3_timeout: float = DEFAULT_S3_TIMEOUT,
) -> BlobStore:
    """The store a `QP_STORAGE` URL names: `file://PATH` or `s3://BUCKET[/PREFIX]`."""
    if url.startswith("file://"):
        return FileBlobStore.open(file_store_root(url))
    return await S3BlobStore.open(url, endpoint_url, region, exit_stack, profile, s3_timeout)


def file_store_root(url: str) -> Path:
    return Path(url[len("file://") :])
