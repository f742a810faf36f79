"""Free disk space: the floor below which new chats wait (507), and a small reserve file
that makes room for deletes, undos and start-up when the disk is full anyway.

Something other than qp (logs, another program) can fill the disk past the floor. Then
even a DELETE needs a few pages of SQLite's write-ahead log, and opening the database needs
its shared-memory file. The reserve is a file of a few MiB allocated while there is room;
each time such a maintenance write fails for lack of space it gives back one MiB and the
write is tried again. Until the disk has room for the whole reserve again, new chats and
updates are refused, so the room it freed stays for the deletes that make more.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from qp.errors import FULL, StorageUnavailable, insufficient_storage

log = logging.getLogger("qp.storage.disk")

MIB = 1024 * 1024
RESERVE_BYTES = 4 * MIB
RESERVE_CHUNK = 1 * MIB
# The reserve is allocated (again) only while the disk has this much free.
RESERVE_WHEN_FREE = 4 * RESERVE_BYTES


class DiskSpace:
    """Free space of the folders qp writes to (the database's, a file blob store's)."""

    def __init__(self, folders: Iterable[Path], min_free_bytes: int, reserve: Path | None):
        self.folders = tuple(dict.fromkeys(Path(f) for f in folders))
        self.min_free_bytes = min_free_bytes
        self.reserve = reserve

    def free_bytes(self) -> int | None:
        """The least free space among the folders (what an unprivileged writer may use);
        None when it cannot be measured."""
        free = []
        for folder in self.folders:
            try:
                stat = os.statvfs(folder)
            except OSError:
                continue
            free.append(stat.f_bavail * stat.f_frsize)
        return min(free) if free else None

    def check_room(self) -> None:
        """Before a new chat or an update: 507 below the operator's floor; 503 (full) when
        the reserve is not whole and the disk has no room for it, so that the room it gave
        back stays for deletes."""
        if self.below_floor():
            raise insufficient_storage()
        if self.reserve_used_up():
            raise StorageUnavailable("Storage", "the disk is full", FULL)

    def below_floor(self) -> bool:
        free = self.free_bytes()
        return free is not None and free < self.min_free_bytes

    def reserve_used_up(self) -> bool:
        if self.reserve is None or self._reserve_size() >= RESERVE_BYTES:
            return False
        free = self.free_bytes()
        return free is not None and free < RESERVE_BYTES

    def keep_reserve(self) -> None:
        """Allocate the whole reserve if part of it is missing and the disk has room."""
        if self.reserve is None or self._reserve_size() >= RESERVE_BYTES:
            return
        free = self.free_bytes()
        if free is None or free < RESERVE_WHEN_FREE:
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            log.warning("cannot allocate the disk reserve %s: %s", self.reserve, err.strerror)

    def release_reserve(self) -> bool:
        """Give one MiB of the reserve back (a maintenance write needs room); False when
        there is none left."""
        if self.reserve is None:
            return False
        size = self._reserve_size()
        if size == 0:
            return False
        try:
            os.truncate(self.reserve, max(0, size - RESERVE_CHUNK))
        except OSError as err:
            log.error("cannot release the disk reserve %s: %s", self.reserve, err.strerror)
            return False
        log.warning(
            "the disk is full: gave back %d KiB of the reserve", min(size, RESERVE_CHUNK) // 1024
        )
        return True

    def _reserve_size(self) -> int:
        assert self.reserve is not None
        with contextlib.suppress(OSError):
            return os.stat(self.reserve).st_blocks * 512
        return 0


DISK_SPACE = web.AppKey("disk_space", DiskSpace)
