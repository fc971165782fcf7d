"""Writing files so that a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from simsearch.faults import crash_point


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Permissions for files we create through mkstemp (which makes them 0600): what open() gives.
FILE_MODE = _file_mode()


@contextlib.contextmanager
def replaced_atomically(dest: Path, crash_point_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; the file written there then becomes `dest`.

    When the block ends, the new file is fsynced, renamed over `dest`, and the rename made
    durable. If the block fails, the temporary file (with any SQLite -wal/-shm companions)
    is removed and `dest` is untouched. `crash_point_name` names the fault-injection point
    between the fsync and the rename.
    """
    dest = Path(dest)
    fd, name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, FILE_MODE)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if crash_point_name:
            crash_point(crash_point_name)
        os.replace(tmp, dest)
    finally:
        for leftover in (tmp, Path(name + "-wal"), Path(name + "-shm")):
            leftover.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
