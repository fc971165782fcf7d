"""The index run's plan (ops.ingest): list the files, sort them against the index.

What the scan finds, before any file is read:
- files to read: new, or changed since indexed (size or mtime), or not stat-able (their
  error is recorded);
- unchanged files (same path, size and mtime): skipped, not even opened; those whose rows
  lack what newer versions record (the header's true size and format, the device) are
  brought up to date from the header alone (`refresh`);
- files gone from the folders being indexed, to be removed; but never files that may only be
  out of reach, on a disk that is not mounted now (`disappeared`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from simsearch.errors import ImageError
from simsearch.fs.faults import crash_point
from simsearch.media.discover import find_images
from simsearch.media.header import header_facts
from simsearch.media.objects import is_url, list_objects
from simsearch.storage.store import STATUS_OK, Known, Store

log = logging.getLogger(__name__)

# A file to read: (real path, path as stored, size, mtime_ns, st_dev, error); the stat
# error, if any, is recorded as the file's without reading it.
ToRead = tuple[str, str, int, int, int | None, str | None]


@dataclass
class Stale:
    """Unchanged files whose rows lack what newer versions record."""

    facts: list[tuple[str, int, int, int]] = field(default_factory=list)  # real, id, size, mtime
    devices: list[tuple[int, int]] = field(default_factory=list)  # id, st_dev now


@dataclass
class Scan:
    """What the listing found, sorted against what the index holds."""

    roots: list[Path]  # the folders being indexed, absolute
    prefixes: list[str]  # the object-store URLs being indexed (media.objects)
    unlisted: list[Path]  # folders under them that could not be listed
    passed_over: dict[str, Counter]  # folders with files, none of them images
    files: list[Path]  # every image file listed
    objects: list[str]  # every image object listed, by URL
    known: dict[str, Known]  # every indexed file, by stored path
    hashes: dict[str, int]  # content already embedded: sha256 -> image id
    todo: list[ToRead]  # the files to read
    listed: set[str]  # every listed path as stored
    unchanged: int
    stale: Stale


def scan(paths: Iterable[str | os.PathLike], store: Store) -> Scan:
    """List the images under `paths` and sort them into files to read and unchanged ones."""
    paths = list(paths)
    prefixes = [str(p).rstrip("/") for p in paths if is_url(p)]
    roots = [Path(os.path.abspath(p)) for p in paths if not is_url(p)]
    unlisted: list[Path] = []
    passed_over: dict[str, Counter] = {}
    files = list(find_images(roots, unlisted, passed_over))
    listing = {url: (size, mtime) for p in prefixes for url, size, mtime in list_objects(p)}
    crash_point("listed")
    known = store.known_files()
    hashes = store.vector_hashes()  # read by the decode threads: content already embedded
    todo, listed, unchanged, stale = _sort(files, known)
    for url, (size, mtime_ns) in listing.items():
        listed.add(url)
        prior = known.get(url)
        if prior is not None and prior.same(size, mtime_ns):
            unchanged += 1
        else:
            todo.append((url, url, size, mtime_ns, None, None))
    return Scan(
        roots,
        prefixes,
        unlisted,
        passed_over,
        files,
        list(listing),
        known,
        hashes,
        todo,
        listed,
        unchanged,
        stale,
    )


def _sort(files: list[Path], known: dict[str, Known]) -> tuple[list[ToRead], set[str], int, Stale]:
    """Return (files to read, every listed path as stored, how many are unchanged, the
    unchanged ones whose rows need the header's facts or their device)."""
    todo: list[ToRead] = []
    listed: set[str] = set()
    unchanged = 0
    stale = Stale()
    for path in files:
        real = str(path)
        key = _storable(real)
        listed.add(key)
        try:
            st = path.stat()
        except OSError as exc:
            todo.append((real, key, -1, -1, None, _stat_error(path, exc)))
            continue
        prior = known.get(key)
        if prior is not None and prior.unchanged(st):
            unchanged += 1
            if not prior.has_facts:
                stale.facts.append((real, prior.id, st.st_size, st.st_mtime_ns))
            if prior.device != st.st_dev:
                stale.devices.append((prior.id, st.st_dev))
        else:
            todo.append((real, key, st.st_size, st.st_mtime_ns, st.st_dev, None))
    return todo, listed, unchanged, stale


# Files whose header is read per transaction when bringing old rows up to date.
REFRESH_CHUNK = 1_000


def refresh(stale: Stale, store: Store, pool: ThreadPoolExecutor) -> None:
    """Record the true pixel size and format (from the header; no model, no decode) of
    unchanged files indexed before they were recorded, and the device of files whose file
    system now has another number; a chunk per transaction, so an interrupted run keeps
    what it did."""
    store.set_devices(stale.devices)
    for start in range(0, len(stale.facts), REFRESH_CHUNK):
        chunk = stale.facts[start : start + REFRESH_CHUNK]
        store.set_header_facts([row for row in pool.map(_header_row, chunk) if row is not None])
    if stale.facts:
        log.info(
            "read the true pixel size of %d files indexed before it was kept", len(stale.facts)
        )


def _header_row(item: tuple[str, int, int, int]) -> tuple | None:
    real, image_id, size, mtime_ns = item
    try:
        st = os.stat(real)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return None  # changed since listed: the next run indexes it again
        facts = header_facts(real)
    except (OSError, ImageError):
        return None
    return image_id, facts.width, facts.height, facts.format, facts.lossless


def disappeared(found: Scan) -> dict[str, Known]:
    """Return the indexed files under the scan's roots that the listing no longer found.

    A file is not reported gone when it may only be out of reach: under a folder that could
    not be listed; under a root folder that lists no images at all while the index has some
    there; or when the nearest folder on its way that still exists is empty now, or sits on
    another file system than the file did and holds no listed image. An unmounted disk looks
    like that (its mount point is an empty folder of the parent file system), and removing
    its files from the index would lose their labels, clusters and vectors.
    """
    known, listed, roots = found.known, found.listed, found.roots
    # Objects (URLs) are never under a folder: each prefix is looked at below.
    empty_roots = []
    for root in roots:
        prefix = str(root) + os.sep
        if root.is_dir() and not any(p.startswith(prefix) for p in listed):
            empty_roots.append(root)
    keep_under = [str(p) + os.sep for p in (*found.unlisted, *empty_roots)]
    gone = {}
    held = {str(root): 0 for root in empty_roots}
    reach = _Reach({os.path.dirname(p) for p in listed})
    lost: dict[tuple[str, str], int] = {}
    for key, row in known.items():
        if key in listed or not _under(key, roots):
            continue
        blocked = next((k for k in keep_under if key.startswith(k)), None)
        if blocked is not None:
            if blocked[:-1] in held:
                held[blocked[:-1]] += 1
            continue
        out_of_reach = reach.why_unreachable(key, row.device, roots)
        if out_of_reach is None:
            gone[key] = row
        else:
            lost[out_of_reach] = lost.get(out_of_reach, 0) + 1
    for prefix in found.prefixes:
        under = [k for k in known if k == prefix or k.startswith(prefix + "/")]
        missing = [k for k in under if k not in listed]
        if missing and len(missing) == len(under):
            # Nothing listed where images were: a wrong endpoint or credentials, a bucket
            # being restored; an object store that lost everything is not the likely case.
            log.warning(
                "not removing %d indexed objects under %s: it lists none of them now",
                len(missing),
                prefix,
            )
            continue
        gone.update((k, known[k]) for k in missing)
    for held_root, count in held.items():
        if count:
            log.warning(
                "not removing %d indexed files under %s: it holds no images now (unmounted?)",
                count,
                held_root,
            )
    for (folder, why), count in sorted(lost.items()):
        log.warning(
            "not removing %d indexed files under %s: %s (an unmounted disk?); if they are "
            "really gone, remove that folder and run index again",
            count,
            folder,
            why,
        )
    return gone


def by_content(gone: dict[str, Known]) -> dict[str, list[str]]:
    """The paths of the gone files with a vector, by content (SHA-256): a new path with one
    of these contents is a rename, and the row follows it."""
    gone_by_hash: dict[str, list[str]] = {}
    for key, row in gone.items():
        if row.sha256 and row.status == STATUS_OK:
            gone_by_hash.setdefault(row.sha256, []).append(key)
    return gone_by_hash


class _Reach:
    """Tells a file that is gone from one that is out of reach, looking at the nearest
    folder on its way that still exists (each folder looked at once per run)."""

    def __init__(self, listed_dirs: set[str]) -> None:
        self.listed_dirs = listed_dirs  # folders that directly hold a listed image
        self.folders: dict[str, tuple[int, bool] | None] = {}  # folder -> (st_dev, empty)

    def why_unreachable(
        self, key: str, device: int | None, roots: list[Path]
    ) -> tuple[str, str] | None:
        """Return (folder, reason) when the file at `key` may be on a file system that is
        not mounted now, None when it is simply gone."""
        top = next(str(r) for r in roots if key.startswith(str(r) + os.sep) or key == str(r))
        folder = os.path.dirname(key)
        while True:
            found = self._look(folder)
            if found is not None or len(folder) <= len(top):
                break
            folder = os.path.dirname(folder)
        if found is None:
            return None
        st_dev, empty = found
        if empty:
            return folder, "that folder is empty now"
        if device is not None and device != st_dev and folder not in self.listed_dirs:
            return folder, "they were on another file system than that folder is on now"
        return None

    def _look(self, folder: str) -> tuple[int, bool] | None:
        """(st_dev, empty) of an existing folder, None where there is none."""
        if folder not in self.folders:
            try:
                st_dev = os.stat(folder).st_dev
                with os.scandir(folder) as entries:
                    empty = next(entries, None) is None
                self.folders[folder] = (st_dev, empty)
            except OSError:
                self.folders[folder] = None
        return self.folders[folder]


def _under(key: str, roots: list[Path]) -> bool:
    return any(key == str(r) or key.startswith(str(r) + os.sep) for r in roots)


def _stat_error(path: Path, exc: OSError) -> str:
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "symbolic link loop: the link points back at itself"
        return "broken symbolic link: its target does not exist"
    return f"cannot stat file: {exc.strerror or exc}"


def _storable(path: str) -> str:
    """Return `path` as the store keys it: unchanged. The store keeps a name that is not
    UTF-8 losslessly as its bytes (store.FsPath), so no escaping is needed, and an escape
    could collide with a real name that spells it."""
    return path
