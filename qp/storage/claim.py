"""One owner per database: an exclusive claim held for the life of the process.

The claim is an OS lock (`flock`) on a lock file beside the database (and one in a file
blob folder). The kernel drops it when its holder dies, however it dies, so a crash never
leaves a stale claim. Whoever holds it may finish or undo interrupted writes; anybody
else (a second server, `check --repair` beside a live server) must assume that writes are
in flight. The file names its holder (pid, database, how long its writes may take) so a
refusal can say who holds it and the repair tool can wait out the holder's writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from qp.errors import READ_ONLY, os_error_reason
from qp.storage.file_watch import identity, identity_at

# The holder's record is rewritten in place at a fixed size: never truncated, so a full
# disk cannot leave the file without its blocks.
RECORD_BYTES = 512
READ_RETRY_SECONDS = 0.5


class ClaimHeld(Exception):
    """Another live process holds the claim; `holder` is its record (pid, ...), maybe empty.
    `guarded` is what the lock guards (the database or blob folder), for messages."""

    def __init__(self, lock_path: Path, holder: dict[str, Any]):
        super().__init__(f"{lock_path} is held by pid {holder.get('pid', 'unknown')}")
        self.lock_path = lock_path
        self.holder = holder
        self.guarded: Path = lock_path

    @property
    def pid(self) -> str:
        return str(self.holder.get("pid", "unknown"))


class Claim:
    """A held claim: the open, locked lock file. `release()` (or the process ending) frees it."""

    def __init__(self, lock_path: Path, fd: int):
        self.lock_path = lock_path
        self._fd: int | None = fd
        self._identity = identity(os.fstat(fd))

    @classmethod
    def take(cls, lock_path: Path, record: dict[str, Any]) -> Claim:
        """Claim `lock_path` now or raise ClaimHeld; OSError when the file cannot be made."""
        while True:
            fd = _open(lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise ClaimHeld(lock_path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The file may have been deleted or replaced between open and lock: then the
            # lock guards nothing. Try again on whatever is at the path now.
            if identity_at(lock_path) == identity(os.fstat(fd)):
                break
            os.close(fd)
        claim = cls(lock_path, fd)
        claim._write_record(record)
        return claim

    def still_held(self) -> bool:
        """True while the lock file at the path is the one this claim locked."""
        return self._fd is not None and identity_at(self.lock_path) == self._identity

    def renew(self, record: dict[str, Any]) -> bool:
        """After the lock file was deleted or replaced: lock what is at the path now. False
        when another process got there first (the claim is lost)."""
        try:
            fresh = Claim.take(self.lock_path, record)
        except (ClaimHeld, OSError):
            return False
        self.release()
        self._fd, self._identity = fresh._fd, fresh._identity
        fresh._fd = None
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_record(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()[: RECORD_BYTES - 1].ljust(RECORD_BYTES - 1) + b"\n"
        # On a full or read-only disk the lock holds all the same; only the pid is unknown.
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, data, 0)  # type: ignore[arg-type]


def holder_of(lock_path: Path) -> dict[str, Any] | None:
    """The record of whoever holds the claim now, or None when nobody does."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open(lock_path: Path) -> int:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        # A read-only filesystem (or file) can still be locked through a read-only descriptor.
        if os_error_reason(err) == READ_ONLY and lock_path.exists():
            return os.open(lock_path, os.O_RDONLY)
        raise


def _read_record(fd: int) -> dict[str, Any]:
    """The holder's record; a holder that has just locked may not have written it yet."""
    deadline = time.monotonic() + READ_RETRY_SECONDS
    while True:
        try:
            record = json.loads(os.pread(fd, RECORD_BYTES, 0) or b"{}")
            if isinstance(record, dict) and record:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)
