"""S3BlobStore: blobs in any S3-compatible bucket (Cloudflare R2, SeaweedFS, MinIO, AWS)
through one aiobotocore client for the life of the process, every call with a deadline."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.loaders import Loader, create_loader

from qp.errors import FULL, UNAVAILABLE, StorageUnavailable
from qp.storage.blobs import (
    BlobReader,
    FileReader,
    StoredBlob,
    StoreNotReady,
    check_key,
    os_failure,
    shown_key,
)

# What a request to S3 can fail with when the store is down, slow or refusing.
_S3_FAILURES = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)

DEFAULT_S3_TIMEOUT = 30.0
DELETE_BATCH = 1000
SPOOL_CHUNK = 256 * 1024


def _s3_failure(action: str, key: str, err: Exception) -> StorageUnavailable:
    key = shown_key(key)
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


@functools.cache
def _data_loader(data_path: str | None) -> Loader:
    """botocore's service descriptions, read from disk once per process: a new session
    would parse them again for its client (about 40 ms of CPU each time)."""
    return create_loader(data_path)


class S3BlobStore:
    """Blobs in an S3-compatible bucket, under an optional key prefix.

    Every call has a deadline (`timeout`, QP_S3_TIMEOUT): a store that accepts connections
    and never answers costs a request that long at most.
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
        session.register_component(
            "data_loader", _data_loader(session.get_config_variable("data_path"))
        )
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
        spool = await asyncio.to_thread(tempfile.TemporaryFile, mode="w+b", dir=self.spool_dir)
        try:

            async def spill(piece: bytes) -> None:
                await asyncio.to_thread(spool.write, piece)

            if not await self._fetch(key, spill):
                return None
            await asyncio.to_thread(spool.seek, 0)
            return FileReader(os.dup(spool.fileno()))
        except OSError as err:
            raise os_failure("spool", key, err) from err
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

    async def delete_many(self, keys: list[str]) -> None:
        """One DeleteObjects request per 1,000 keys (the most S3 takes at once)."""
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            objects = [{"Key": self._key(key)} for key in batch]
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                    )
            except _S3_FAILURES as err:
                raise _s3_failure("delete", batch[0], err) from err
            if answer.get("Errors"):
                error = answer["Errors"][0]
                raise StorageUnavailable(
                    "Storage",
                    f"delete {shown_key(batch[0])}: {len(answer['Errors'])} keys refused"
                    f" ({error.get('Code')})",
                )

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
