"""Writing files so that a crash leaves either the old file or the new one, never half of one;
naming temporary files so that only simsearch's own are ever tidied; and moving a user's
file without following a symbolic link or replacing anything."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from simsearch.fs.faults import crash_point


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Permissions for files we create through mkstemp (which makes them 0600): what open() gives.
FILE_MODE = _file_mode()

# Every temporary name simsearch makes starts so: no user names a file like this, so the
# leftovers of a crash can be tidied by exact pattern without touching anything else.
TEMP_PREFIX = ".simsearch-tmp-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r".+\.[A-Za-z0-9_]{8}\.tmp(-wal|-shm|-journal)?")

COPY_CHUNK = 1 << 20  # bytes read and written at a time by a cross-device move

# What opening a path component that is a symbolic link with O_NOFOLLOW raises.
LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, getattr(errno, "EMLINK", errno.ELOOP))


def is_temp_leftover(path: Path) -> bool:
    """Whether `path` is a temporary file that `replaced_atomically` made (a crash's
    leftover), by its exact name pattern: a regular file, never a link or a folder."""
    return bool(_TEMP_NAME.fullmatch(path.name)) and path.is_file() and not path.is_symlink()


def remove_temp_leftovers(folder: Path) -> None:
    """Delete what crashed writes left in `folder`: only names simsearch makes."""
    for leftover in Path(folder).glob(TEMP_PREFIX + "*"):
        if is_temp_leftover(leftover):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_atomically(
    dest: Path, crash_point_name: str | None = None, *, replace: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; the file written there then becomes `dest`.

    When the block ends, the new file is fsynced, renamed over `dest`, and the rename made
    durable. If the block fails, the temporary file (with any SQLite -wal/-shm companions)
    is removed and `dest` is untouched. `crash_point_name` names the fault-injection point
    between the fsync and the rename. `replace=False`: an existing `dest` (even one made
    while the block ran) is a FileExistsError, never overwritten.
    """
    dest = Path(dest)
    fd, name = tempfile.mkstemp(
        prefix=TEMP_PREFIX + dest.name + ".", suffix=".tmp", dir=dest.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, FILE_MODE)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if crash_point_name:
            crash_point(crash_point_name)
        if replace:
            os.replace(tmp, dest)
        else:
            _rename_new(tmp, dest)
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


def _rename_new(tmp: Path, dest: Path) -> None:
    """Give `tmp` the name `dest` only if no such name exists (a hard link cannot replace
    anything); where links are not supported, check and rename."""
    try:
        os.link(tmp, dest, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from None
        os.rename(tmp, dest)
    else:
        os.unlink(tmp)


def open_folder(root: Path, parts: tuple[str, ...] = (), *, create: bool = False) -> int:
    """Return a file descriptor of the folder root/parts..., opening every part below
    `root` without following a symbolic link (OSError with errno in LINK_ERRNOS where one
    is a link); `create`: make the missing ones. `root` itself is opened as named."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(root, flags)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            inner = os.open(part, flags | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def link_below(root: Path, path: Path) -> Path | None:
    """The first folder between `root` and `path` that is a symbolic link, if any."""
    here = root
    for part in path.parent.relative_to(root).parts:
        here = here / part
        if here.is_symlink():
            return here
    return None


def entry_id(name: str, folder: int) -> tuple[int, int]:
    """(device, inode) of entry `name` of the open folder `folder`, not followed."""
    st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    return st.st_dev, st.st_ino


def move_entry(
    src_root: Path, src: Path, dst_root: Path, dst: Path, expect: tuple[int, int]
) -> None:
    """Move the directory entry src_root/src (a file or a link, never followed) to
    dst_root/dst, keeping its modification time; every folder below the roots is opened
    without following links, and the entry must still be `expect` (device, inode). Across
    file systems: copy to a name of our own, fsync, give it its name, then delete the
    source, so no moment has neither copy. An existing destination is never replaced."""
    source = open_folder(src_root, src.parent.parts)
    try:
        folder = open_folder(dst_root, dst.parent.parts, create=True)
    except BaseException:
        os.close(source)
        raise
    try:
        if entry_id(src.name, source) != expect:
            raise FileNotFoundError(errno.ENOENT, "replaced since it was checked", str(src))
        with contextlib.suppress(FileNotFoundError):
            os.stat(dst.name, dir_fd=folder, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "File exists", str(dst_root / dst))
        try:
            os.rename(src.name, dst.name, src_dir_fd=source, dst_dir_fd=folder)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another file system
                raise
            _copy_across(source, src.name, folder, dst.name)
            os.fsync(folder)
            os.unlink(src.name, dir_fd=source)
        os.fsync(folder)
        os.fsync(source)
    finally:
        os.close(source)
        os.close(folder)


def _copy_across(source: int, name: str, folder: int, dest: str) -> None:
    """Copy entry `name` of folder `source` (a link as a link) to `dest` in `folder`."""
    st = os.stat(name, dir_fd=source, follow_symlinks=False)
    partial = f"{TEMP_PREFIX}{secrets.token_hex(8)}.partial"  # ours alone: O_EXCL
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=source), partial, dir_fd=folder)
        else:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
            src = os.open(name, flags, dir_fd=source)
            try:
                out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=folder)
                try:
                    while chunk := os.read(src, COPY_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(out, view) :]
                    os.fchmod(out, stat.S_IMODE(st.st_mode))
                    os.fsync(out)
                finally:
                    os.close(out)
            finally:
                os.close(src)
        times = (st.st_atime_ns, st.st_mtime_ns)
        if os.utime in os.supports_follow_symlinks or not stat.S_ISLNK(st.st_mode):
            os.utime(partial, ns=times, dir_fd=folder, follow_symlinks=False)
        os.stat(partial, dir_fd=folder, follow_symlinks=False)
        with contextlib.suppress(FileNotFoundError):
            os.stat(dest, dir_fd=folder, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "File exists", dest)
        os.rename(partial, dest, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=folder)  # by its exact name: ours
        raise


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's content, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
