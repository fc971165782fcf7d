"""WriteLock: one writer per index, across processes, that a crash cannot leave behind.

The lock is an advisory `flock` on `index.lock` in the index folder. The kernel releases it
when its holder dies however it dies, so a stale lock from a killed process is simply taken
over. The file also holds the holder's pid, for the "locked by pid N" message.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from simsearch.errors import IndexLockedError, StorageError

LOCK_FILE = "index.lock"


class WriteLock:
    """Exclusive, non-blocking write lock on an index folder. Use as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to `wait` seconds; else raise IndexLockedError naming
        the process that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, as SQLite's own locking
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            why = (
                "is on read-only storage" if exc.errno == errno.EROFS else "is not writable by you"
            )
            raise StorageError(
                f"index {self.path.parent} {why}: it can be searched, not changed; copy it "
                "somewhere writable to change it"
            ) from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise IndexLockedError(
                f"index {self.path.parent} is locked by pid {holder}, which is writing to "
                "it; wait for it to finish (searches keep working meanwhile)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free (and can be taken at all); return whether we hold it."""
        try:
            self.acquire()
        except (IndexLockedError, StorageError):
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
