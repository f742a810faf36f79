"""Blob stores: where a chat's messages array lives, under the key `chats/{chatId}.json`.

`FileBlobStore` keeps them in a folder (atomic writes: temp file, fsync, rename);
`S3BlobStore` in any S3-compatible bucket (Cloudflare R2, SeaweedFS, MinIO, AWS) through
one aiobotocore client for the life of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from qp.errors import StorageUnavailable

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


class BlobStore(Protocol):
    """Bytes by key. Missing keys read as None; any failure raises StorageUnavailable."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None: ...

    def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        """Every blob whose key starts with `prefix` (a folder, ending in `/`)."""
        ...


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    size: int
    modified: float  # epoch seconds


class FileBlobStore:
    """Blobs as files under one folder; a key can never name a path outside it."""

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
            raise StorageUnavailable("Storage", f"read {key}: {err}") from err

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as err:
            raise StorageUnavailable("Storage", f"write {key}: {err}") from err

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as err:
            raise StorageUnavailable("Storage", f"delete {key}: {err}") from err

    async def ping(self) -> None:
        if not await asyncio.to_thread(_writable_folder, self.root):
            raise StorageUnavailable("Storage", f"{self.root} is not a writable folder")

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


def _writable_folder(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder: never a torn blob."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


class S3BlobStore:
    """Blobs in an S3-compatible bucket, under an optional key prefix."""

    def __init__(self, client, bucket: str, prefix: str):
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    @classmethod
    async def open(
        cls,
        url: str,
        endpoint_url: str | None,
        region: str | None,
        exit_stack: AsyncExitStack,
        profile: str | None = None,
    ) -> S3BlobStore:
        """Create the client (closed by `exit_stack`) and check the bucket answers.
        `profile` picks credentials from ~/.aws (botocore's named profiles)."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        config = AioConfig(
            # A store that is down should answer 503 quickly, not after minutes of retries.
            connect_timeout=3,
            read_timeout=30,
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
        store = cls(client, bucket, prefix.strip("/"))
        await store._check_bucket(endpoint_url)
        return store

    async def _check_bucket(self, endpoint_url: str | None) -> None:
        where = endpoint_url or "AWS S3"
        try:
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
        except _S3_FAILURES as err:
            raise StoreNotReady(f"cannot reach S3 at {where}: {err}") from None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def get(self, key: str) -> bytes | None:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            async with response["Body"] as stream:
                return await stream.read()
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StorageUnavailable("Storage", f"get {key}: {err}") from err
        except _S3_FAILURES as err:
            raise StorageUnavailable("Storage", f"get {key}: {err!r}") from err

    async def put(self, key: str, data: bytes) -> None:
        try:
            await self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json"
            )
        except _S3_FAILURES as err:
            raise StorageUnavailable("Storage", f"put {key}: {err!r}") from err

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _S3_FAILURES as err:
            raise StorageUnavailable("Storage", f"delete {key}: {err!r}") from err

    async def ping(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except _S3_FAILURES as err:
            raise StorageUnavailable("Storage", f"head bucket: {err!r}") from err

    async def listing(self, prefix: str) -> AsyncIterator[StoredBlob]:
        skip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield StoredBlob(
                        item["Key"][skip:], item["Size"], item["LastModified"].timestamp()
                    )
        except _S3_FAILURES as err:
            raise StorageUnavailable("Storage", f"list {prefix}: {err!r}") from err


async def open_blob_store(
    url: str,
    endpoint_url: str | None,
    region: str | None,
    exit_stack: AsyncExitStack,
    profile: str | None = None,
) -> BlobStore:
    """The store a `QP_STORAGE` URL names: `file://PATH` or `s3://BUCKET[/PREFIX]`."""
    if url.startswith("file://"):
        return FileBlobStore.open(Path(url[len("file://") :]))
    return await S3BlobStore.open(url, endpoint_url, region, exit_stack, profile)
