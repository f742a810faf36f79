"""Files that must stay the ones opened: a file's identity (device and inode), and
DatabaseFile, which notices the database file being deleted, replaced, truncated or
overwritten under a running server, which would otherwise go on taking SQLite's writes into
a file no restart will find. The lock files of qp/storage/claim.py are checked the same way."""

from __future__ import annotations

import os
from pathlib import Path

SQLITE_MAGIC = b"SQLite format 3\x00"

# What a damaged file looks like to /healthz: the path is gone, holds another file, or the
# file's header or length changed under us.
DELETED = "deleted"
REPLACED = "replaced"
DAMAGED = "damaged"

# A file's device and inode: another file put at the same path has others.
Identity = tuple[int, int]


def identity(stat: os.stat_result) -> Identity:
    return stat.st_dev, stat.st_ino


def identity_at(path: Path) -> Identity | None:
    """The identity of the file at `path` now; None when there is none (or it cannot be read)."""
    try:
        return identity(os.stat(path))
    except OSError:
        return None


class DatabaseFile:
    """Notices the database file being deleted, replaced, truncated or overwritten.

    Holds a read-only descriptor on the file it opened, for the life of the database:
    closing any descriptor of the file would drop SQLite's POSIX locks on it, so it is
    closed only after every connection.
    """

    def __init__(self, path: Path):
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self._fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self._fd)
        self._identity = identity(stat)
        self._size = stat.st_size
        self._wal_identity = identity_at(self.wal_path)

    def problem(self) -> str | None:
        """DELETED, REPLACED or DAMAGED, or None while the file is the one we opened, whole."""
        at_path = identity_at(self.path)
        if at_path is None:
            return DELETED
        if at_path != self._identity:
            return REPLACED
        if self._wal_identity is not None and identity_at(self.wal_path) != self._wal_identity:
            return DAMAGED  # the write-ahead log holding the latest commits was removed
        try:
            size = os.fstat(self._fd).st_size
            header = os.pread(self._fd, len(SQLITE_MAGIC), 0)
        except OSError:
            return DAMAGED
        # SQLite never shrinks the file here (no VACUUM, no auto-vacuum).
        if size < self._size or header != SQLITE_MAGIC:
            return DAMAGED
        self._size = size
        return None

    def close(self) -> None:
        os.close(self._fd)
