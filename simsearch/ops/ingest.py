"""The ingestion pipeline: list files, sort out what changed, decode in threads, embed, store.

What one run does, file by file:
- same path, size and mtime as when indexed: skipped, not even opened;
- content (SHA-256) already embedded: the vector is reused, no model call; when the file
  with that content has disappeared from its old path, the row moves to the new path and
  keeps its id (a rename);
- otherwise decoded and embedded; byte-identical files in one run are embedded once;
- files that disappeared from the folders being indexed are removed (unless prune=False).

Every batch (embedded, reused, moved and failed files together) is one SQLite transaction;
the FAISS index is updated only after the commit, so a crash at any point leaves the
database at the last committed batch and the next run continues from there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from simsearch.config import (
    DEFAULT_WORKERS,
    FAISS_CHECKPOINT_SECONDS,
    MAX_IMAGE_PIXELS,
    PREFETCH_BATCHES,
)
from simsearch.errors import ImageError
from simsearch.fs.faults import crash_point
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.discover import find_images
from simsearch.media.header import header_facts
from simsearch.media.prefetch import read_ahead
from simsearch.media.preprocess import Preprocessing
from simsearch.records import AddSummary, stages_line
from simsearch.search.cache import VectorCache
from simsearch.storage.store import STATUS_OK, BadImage, GoodImage, Known, Moved, Store

log = logging.getLogger(__name__)


class Stopwatch:
    """Seconds spent per stage of a run, summed over its batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def line(self) -> str:
        return stages_line(self.seconds)


# The stages a run's time is reported in. "decoding" is thread time (reading, hashing,
# decoding and preprocessing, summed over the worker threads); "waiting" is how long the main
# thread, which runs the model, sat idle waiting for a decoded image.
STAGES = ("listing", "decoding", "waiting", "model", "database", "faiss")

# With --verbose, report the stage times this often during a run.
PROGRESS_LOG_SECONDS = 30.0


@dataclass
class _Prepared:
    """One file after reading and, when its content is new, decoding."""

    real: str  # the path as the file system has it
    key: str  # the path as stored
    size: int
    mtime_ns: int
    device: int | None = None  # st_dev
    sha256: str | None = None
    pixels: np.ndarray | None = None
    width: int = 0  # from the header: the true size, not the draft-mode decode's
    height: int = 0
    format: str | None = None
    lossless: bool | None = None
    error: str | None = None
    known_id: int | None = None  # an image with the same content already has a vector
    seconds: float = 0.0  # spent reading, hashing, decoding and preprocessing


@dataclass
class _Batch:
    embed: list[_Prepared] = field(default_factory=list)  # new content: through the model
    copy: list[_Prepared] = field(default_factory=list)  # known content: vector reused
    moves: list[Moved] = field(default_factory=list)
    bad: list[BadImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.embed) + len(self.copy) + len(self.moves) + len(self.bad)


def ingest(
    paths: Iterable[str | os.PathLike],
    store: Store,
    vectors: VectorCache,
    embedder,
    *,
    workers: int = DEFAULT_WORKERS,
    prune: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
    progress=None,
    checkpoint: Callable[[], None] | None = None,
    stopwatch: Stopwatch | None = None,
) -> AddSummary:
    """Bring `store` and `vectors` up to date with the images under `paths`.

    `embedder` needs `preprocess`, `embed_pixels(pixels)` and `batch_size`. `progress`, if
    given, is a tqdm-like object: its `total` is set once the files are listed, `update(n)`
    is called as files finish. `checkpoint`, if given, is called every few minutes of a long
    run, after a commit, to save the FAISS index. `stopwatch` collects the time per stage.
    """
    start = time.monotonic()
    timed = stopwatch or Stopwatch()
    with timed("listing"):
        roots = [Path(os.path.abspath(p)) for p in paths]
        unlisted: list[Path] = []
        passed_over: dict[str, Counter] = {}  # folders with files, none of them images
        files = list(find_images(roots, unlisted, passed_over))
        crash_point("listed")
        known = store.known_files()
        hashes = store.vector_hashes()  # read by the decode threads: content already embedded
        todo, listed, unchanged, stale = _scan(files, known)
    gone = _disappeared(known, listed, roots, unlisted) if prune else {}
    gone_by_hash: dict[str, list[str]] = {}
    for key, row in gone.items():
        if row.sha256 and row.status == STATUS_OK:
            gone_by_hash.setdefault(row.sha256, []).append(key)

    if progress is not None:
        progress.total = len(todo)
        progress.refresh()

    counts = dict(indexed=0, failed=0, moved=0, reused=0)
    batch = _Batch()
    last_checkpoint = last_log = time.monotonic()

    def flush() -> None:
        nonlocal batch, last_checkpoint, last_log
        _commit(batch, store, vectors, embedder, hashes, max_pixels, timed)
        counts["indexed"] += len(batch.embed) + len(batch.copy)
        counts["reused"] += len(batch.copy)
        counts["moved"] += len(batch.moves)
        counts["failed"] += len(batch.bad)
        for bad in batch.bad:
            log.warning("skipping %s: %s", bad.path, bad.error)
        if progress is not None:
            progress.update(len(batch))
        batch = _Batch()
        if checkpoint is not None and time.monotonic() - last_checkpoint > FAISS_CHECKPOINT_SECONDS:
            with timed("faiss"):
                checkpoint()
            last_checkpoint = time.monotonic()
        if time.monotonic() - last_log > PROGRESS_LOG_SECONDS:
            log.info("%d of %d files done; %s", done(), len(todo), timed.line())
            last_log = time.monotonic()

    def done() -> int:
        return sum(counts.values()) - counts["reused"]

    window = embedder.batch_size * (PREFETCH_BATCHES + 1)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="simsearch-decode") as pool:
        ready = read_ahead(
            pool,
            lambda item: _prepare(*item, embedder.preprocess, hashes, max_pixels),
            todo,
            window,
        )
        with contextlib.closing(ready):  # on Ctrl-C or an error, what is queued is not decoded
            while True:
                with timed("waiting"):
                    prepared = next(ready, None)
                if prepared is None:
                    break
                timed.seconds["decoding"] += prepared.seconds
                _route(prepared, batch, known, gone, gone_by_hash, hashes)
                if len(batch.embed) >= embedder.batch_size or len(batch) >= 4 * embedder.batch_size:
                    flush()
            if len(batch):
                flush()
            if stale.facts or stale.devices:
                with timed("decoding"):
                    _refresh(stale, store, pool)

    with timed("database"):
        removed = _prune(gone, store, vectors) if gone else 0
    return AddSummary(
        seen=len(files),
        indexed=counts["indexed"],
        unchanged=unchanged,
        failed=counts["failed"],
        moved=counts["moved"],
        removed=removed,
        reused=counts["reused"],
        skipped_suffixes=dict(sum(passed_over.values(), Counter())),
        seconds=time.monotonic() - start,
        stages=timed.seconds,
    )


@dataclass
class _Stale:
    """Unchanged files whose rows lack what newer versions record."""

    facts: list[tuple[str, int, int, int]] = field(default_factory=list)  # real, id, size, mtime
    devices: list[tuple[int, int]] = field(default_factory=list)  # id, st_dev now


def _scan(
    files: list[Path], known: dict[str, Known]
) -> tuple[list[tuple[str, str, int, int, int | None, str | None]], set[str], int, _Stale]:
    """Return (files to read, every listed path as stored, how many are unchanged, the
    unchanged ones whose rows need the header's facts or their device)."""
    todo: list[tuple[str, str, int, int, int | None, str | None]] = []
    listed: set[str] = set()
    unchanged = 0
    stale = _Stale()
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


def _refresh(stale: _Stale, store: Store, pool: ThreadPoolExecutor) -> None:
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


def _route(
    prepared: _Prepared,
    batch: _Batch,
    known: dict[str, Known],
    gone: dict[str, Known],
    gone_by_hash: dict[str, list[str]],
    hashes: dict[str, int],
) -> None:
    """Put a prepared file into the batch as failed, moved, copied or to be embedded."""
    if prepared.error is not None:
        size = max(prepared.size, 0)
        batch.bad.append(
            BadImage(prepared.key, size, prepared.mtime_ns, prepared.error, prepared.sha256)
        )
        return
    assert prepared.sha256 is not None  # read without an error: hashed
    if prepared.known_id is None and prepared.sha256 not in hashes:
        batch.embed.append(prepared)
    elif prepared.key not in known and gone_by_hash.get(prepared.sha256):
        # A new path with the content of a file that has gone: a rename; the row follows.
        old = gone.pop(gone_by_hash[prepared.sha256].pop())
        batch.moves.append(
            Moved(old.id, prepared.key, prepared.size, prepared.mtime_ns, prepared.device)
        )
    else:
        prepared.known_id = prepared.known_id or hashes[prepared.sha256]
        batch.copy.append(prepared)


def _commit(
    batch: _Batch,
    store: Store,
    vectors: VectorCache,
    embedder,
    hashes: dict,
    max_pixels: int,
    timed: Stopwatch,
) -> None:
    """Embed what is new in `batch`, write it all in one transaction, then mirror to FAISS."""
    # _route gave every copy the id of its source; everything embedded has its pixels.
    sources = store.copy_sources({cast(int, item.known_id) for item in batch.copy})
    copies = []
    for item in batch.copy:
        source = sources.get(cast(int, item.known_id))
        if source is not None and source[3] == item.sha256:
            copies.append((item, source))
            continue
        # The image we meant to copy from changed in this run: embed this one after all.
        fresh = _prepare(
            item.real,
            item.key,
            item.size,
            item.mtime_ns,
            item.device,
            None,
            embedder.preprocess,
            {},
            max_pixels,
        )
        if fresh.error is not None:
            batch.bad.append(BadImage(fresh.key, fresh.size, fresh.mtime_ns, fresh.error))
        else:
            batch.embed.append(fresh)
    batch.copy = [item for item, _ in copies]

    # Byte-identical files within the batch go through the model once.
    firsts: dict[str, _Prepared] = {}
    for item in batch.embed:
        firsts.setdefault(cast(str, item.sha256), item)
    row_of = {sha: i for i, sha in enumerate(firsts)}
    with timed("model"):
        embedded = (
            embedder.embed_pixels(np.stack([cast(np.ndarray, it.pixels) for it in firsts.values()]))
            if firsts
            else np.empty((0, vectors.dim), dtype=np.float32)
        )
    crash_point("model")
    good = [_good(item) for item in (*batch.embed, *batch.copy)]
    rows = [embedded[row_of[cast(str, item.sha256)]] for item in batch.embed]
    rows += [vec for _, (vec, *_) in copies]
    matrix = np.stack(rows) if rows else np.empty((0, vectors.dim), dtype=np.float32)
    # Ctrl-C waits for the commit and its mirror in FAISS: the index in memory then always
    # matches the database, and an interrupted run can save it (`verify` passes after).
    with _interrupt_deferred():
        vectors.mirror_pending = True  # until FAISS has what the database has
        with timed("database"):
            ids, dropped = store.write_batch(good, matrix, batch.bad, batch.moves)
        crash_point("after-commit")
        with timed("faiss"):
            vectors.add(np.asarray(ids, dtype=np.int64), matrix)
            vectors.remove(np.asarray(dropped, dtype=np.int64))
        vectors.mirror_pending = False
    for img, image_id in zip(good, ids, strict=True):
        hashes[img.sha256] = image_id


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives in the block until it ends, then raise it. Only
    where Python's own handler is installed, in the main thread; elsewhere, no change."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _good(item: _Prepared) -> GoodImage:
    return GoodImage(
        item.key,
        item.size,
        item.mtime_ns,
        cast(str, item.sha256),  # read without an error: hashed
        item.width,
        item.height,
        item.format,
        item.lossless,
        item.device,
    )


def _disappeared(
    known: dict[str, Known], listed: set[str], roots: list[Path], unlisted: list[Path]
) -> dict[str, Known]:
    """Return the indexed files under `roots` that the listing no longer found.

    A file is not reported gone when it may only be out of reach: under a folder that could
    not be listed; under a root folder that lists no images at all while the index has some
    there; or when the nearest folder on its way that still exists is empty now, or sits on
    another file system than the file did and holds no listed image. An unmounted disk looks
    like that (its mount point is an empty folder of the parent file system), and removing
    its files from the index would lose their labels, clusters and vectors.
    """
    empty_roots = []
    for root in roots:
        prefix = str(root) + os.sep
        if root.is_dir() and not any(p.startswith(prefix) for p in listed):
            empty_roots.append(root)
    keep_under = [str(p) + os.sep for p in (*unlisted, *empty_roots)]
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


def _prune(gone: dict[str, Known], store: Store, vectors: VectorCache) -> int:
    ids = [row.id for row in gone.values()]
    removed = store.remove_images(ids)
    vectors.remove(np.asarray(ids, dtype=np.int64))
    for key in sorted(gone):
        log.info("removed %s: the file is gone", key)
    return removed


def _prepare(
    real: str,
    key: str,
    size: int,
    mtime_ns: int,
    device: int | None,
    error: str | None,
    preprocess: Preprocessing,
    hashes: dict[str, int],
    max_pixels: int,
) -> _Prepared:
    """Read and hash one file; decode and preprocess it unless its content is known."""
    start = time.perf_counter()
    item = _Prepared(real, key, size, mtime_ns, device, error=error)
    if item.error is not None:
        return item
    try:
        data = read_image_file(real)
        item.size = len(data)
        item.sha256 = hashlib.sha256(data).hexdigest()
        item.known_id = hashes.get(item.sha256)
        if item.known_id is None:  # new content: decode it (known content needs no model)
            item.pixels = preprocess(decode_image(data, max_pixels, draft=preprocess, name=real))
        # From the header: a JPEG decoded in draft mode is smaller than the file.
        facts = header_facts(data, name=real)
        item.width, item.height = facts.width, facts.height
        item.format, item.lossless = facts.format, facts.lossless
    except ImageError as exc:
        item.error = str(exc)
    except Exception as exc:  # a bug in a codec must cost one file, not the run
        log.debug("unexpected error on %s", real, exc_info=True)
        item.error = f"{type(exc).__name__}: {exc}"
    item.seconds = time.perf_counter() - start
    return item


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
