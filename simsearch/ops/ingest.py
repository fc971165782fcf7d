"""The index run: list files, sort out what changed, decode in threads, embed, store.

What one run does, file by file:
- same path, size and mtime as when indexed: skipped, not even opened;
- content (SHA-256) already embedded: the vector is reused, no model call; when the file
  with that content has disappeared from its old path, the row moves to the new path and
  keeps its id (a rename);
- otherwise decoded and embedded; byte-identical files in one run are embedded once;
- files that disappeared from the folders being indexed are removed (unless prune=False).

The stages, in order: the plan (ops.scan: what to read, what is unchanged, what is gone);
the reader (`_read_ahead`: threads read, hash and decode a few batches ahead of the model);
then, a batch at a time (`_Run.flush`), the embed stage (`_embed`) and the writer
(ops.writer). Every batch (embedded, reused, moved and failed files together) is one SQLite
transaction; the FAISS index is updated only after the commit, so a crash at any point
leaves the database at the last committed batch and the next run continues from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from simsearch import config
from simsearch.config import DEFAULT_WORKERS, MAX_IMAGE_PIXELS, PREFETCH_BATCHES
from simsearch.fs.faults import crash_point
from simsearch.media.prefetch import read_ahead
from simsearch.models.protocol import PixelEmbedder
from simsearch.ops.prepare import Prepared, prepare
from simsearch.ops.scan import Scan, by_content, disappeared, refresh, scan
from simsearch.ops.writer import remove_gone, write_batch
from simsearch.progress import Progress, advance, set_total
from simsearch.records import AddSummary, stages_line
from simsearch.search.cache import VectorCache
from simsearch.storage.store import BadImage, GoodImage, Known, Moved, Store

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


# Reads, decodes and embeds a run's files elsewhere: (files to read, content embedded so
# far, max_pixels) -> each file's Prepared, with its vector (see ingest's `remote`).
Remote = Callable[[list, dict[str, int], int], Iterator[Prepared]]

# The stages a run's time is reported in. "decoding" is thread time (reading, hashing,
# decoding and preprocessing, summed over the worker threads); "waiting" is how long the main
# thread, which runs the model, sat idle waiting for a decoded image.
STAGES = ("listing", "decoding", "waiting", "model", "database", "faiss")

# With --verbose, report the stage times this often during a run.
PROGRESS_LOG_SECONDS = 30.0


def ingest(
    paths: Iterable[str | os.PathLike],
    store: Store,
    vectors: VectorCache,
    embedder: PixelEmbedder,
    *,
    workers: int = DEFAULT_WORKERS,
    prune: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
    progress: Progress | None = None,
    checkpoint: Callable[[], None] | None = None,
    stopwatch: Stopwatch | None = None,
    remote: Remote | None = None,
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
        found = scan(paths, store)
    gone = disappeared(found) if prune else {}

    set_total(progress, len(found.todo))

    run = _Run(store, vectors, embedder, max_pixels, timed, progress, checkpoint, found, gone)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="simsearch-decode") as pool:
        if remote is None:
            _read_ahead(run, pool)  # hands each file to the run, which commits full batches
        else:
            _take_all(run, remote(found.todo, run.hashes, max_pixels))
        if len(run.batch):
            run.flush()
        if found.stale.facts or found.stale.devices:
            with timed("decoding"):
                refresh(found.stale, store, pool)

    with timed("database"):
        removed = remove_gone(gone, store, vectors) if gone else 0
    return AddSummary(
        seen=len(found.files) + len(found.objects),
        indexed=run.counts["indexed"],
        unchanged=found.unchanged,
        failed=run.counts["failed"],
        moved=run.counts["moved"],
        removed=removed,
        reused=run.counts["reused"],
        skipped_suffixes=dict(sum(found.passed_over.values(), Counter())),
        seconds=time.monotonic() - start,
        stages=timed.seconds,
    )


@dataclass
class _Batch:
    embed: list[Prepared] = field(default_factory=list)  # new content: through the model
    copy: list[Prepared] = field(default_factory=list)  # known content: vector reused
    moves: list[Moved] = field(default_factory=list)
    bad: list[BadImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.embed) + len(self.copy) + len(self.moves) + len(self.bad)


@dataclass
class _Run:
    """One index run's state: what it writes to, the batch being filled, what it has done."""

    store: Store
    vectors: VectorCache
    embedder: PixelEmbedder
    max_pixels: int
    timed: Stopwatch
    progress: Any
    checkpoint: Callable[[], None] | None
    found: Scan
    gone: dict[str, Known]  # files to remove; a rename takes its file out
    gone_by_hash: dict[str, list[str]] = field(init=False)
    hashes: dict[str, int] = field(init=False)  # content embedded: grows with each commit
    batch: _Batch = field(default_factory=_Batch)
    counts: dict[str, int] = field(
        default_factory=lambda: dict(indexed=0, failed=0, moved=0, reused=0)
    )
    last_checkpoint: float = field(default_factory=time.monotonic)
    last_log: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.gone_by_hash = by_content(self.gone)
        self.hashes = self.found.hashes  # read by the decode threads too

    def take(self, prepared: Prepared) -> None:
        """Add a prepared file to the batch; embed and write the batch once it is full."""
        _route(prepared, self.batch, self.found.known, self.gone, self.gone_by_hash, self.hashes)
        size = self.embedder.batch_size
        if len(self.batch.embed) >= size or len(self.batch) >= 4 * size:
            self.flush()

    def flush(self) -> None:
        """Embed and write the batch, count it, and start a new one; save the FAISS index
        and log progress when it is time."""
        batch = self.batch
        good, matrix = _embed(self, batch)
        ids = write_batch(
            self.store, self.vectors, self.timed, good, matrix, batch.bad, batch.moves
        )
        for img, image_id in zip(good, ids, strict=True):
            self.hashes[img.sha256] = image_id
        self.counts["indexed"] += len(batch.embed) + len(batch.copy)
        self.counts["reused"] += len(batch.copy)
        self.counts["moved"] += len(batch.moves)
        self.counts["failed"] += len(batch.bad)
        for bad in batch.bad:
            log.warning("skipping %s: %s", bad.path, bad.error)
        advance(self.progress, len(batch))
        self.batch = _Batch()
        since_checkpoint = time.monotonic() - self.last_checkpoint
        if self.checkpoint is not None and since_checkpoint > config.FAISS_CHECKPOINT_SECONDS:
            with self.timed("faiss"):
                self.checkpoint()
            self.last_checkpoint = time.monotonic()
        if time.monotonic() - self.last_log > PROGRESS_LOG_SECONDS:
            log.info(
                "%d of %d files done; %s", self.done(), len(self.found.todo), self.timed.line()
            )
            self.last_log = time.monotonic()

    def done(self) -> int:
        return sum(self.counts.values()) - self.counts["reused"]


# -- the reader: read, hash and decode ahead of the model -------------------------------------


def _take_all(run: _Run, ready: Iterator[Prepared]) -> None:
    """Hand each file that `ready` yields to the run, timing the wait for it; on Ctrl-C or
    an error, `ready` is closed (what the reader has queued is not decoded)."""
    with contextlib.closing(ready):  # type: ignore[type-var]
        while True:
            with run.timed("waiting"):
                prepared = next(ready, None)
            if prepared is None:
                break
            run.timed.seconds["decoding"] += prepared.seconds
            run.take(prepared)


def _read_ahead(run: _Run, pool: ThreadPoolExecutor) -> None:
    """Prepare the files to read in `pool`'s threads, up to PREFETCH_BATCHES batches ahead
    of the model, and hand each to `run.take` in listing order."""
    embedder, hashes, max_pixels = run.embedder, run.hashes, run.max_pixels
    window = embedder.batch_size * (PREFETCH_BATCHES + 1)
    ready = read_ahead(
        pool,
        lambda item: prepare(*item, embedder.preprocess, hashes, max_pixels),
        run.found.todo,
        window,
    )
    _take_all(run, ready)


def _route(
    prepared: Prepared,
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


# -- the embed stage (then the writer, ops.writer) ----------------------------------------


def _embed(run: _Run, batch: _Batch) -> tuple[list[GoodImage], np.ndarray]:
    """Embed what is new in `batch` (and reuse the stored vectors of known content); return
    the images to write and their vectors, row for row."""
    # _route gave every copy the id of its source; everything embedded has its pixels.
    sources = run.store.copy_sources({cast(int, item.known_id) for item in batch.copy})
    copies = []
    for item in batch.copy:
        source = sources.get(cast(int, item.known_id))
        if source is not None and source[3] == item.sha256:
            copies.append((item, source))
            continue
        # The image we meant to copy from changed in this run: embed this one after all.
        fresh = prepare(
            item.real,
            item.key,
            item.size,
            item.mtime_ns,
            item.device,
            None,
            run.embedder.preprocess,
            {},
            run.max_pixels,
        )
        if fresh.error is not None:
            batch.bad.append(BadImage(fresh.key, fresh.size, fresh.mtime_ns, fresh.error))
        else:
            batch.embed.append(fresh)
    batch.copy = [item for item, _ in copies]

    # Byte-identical files within the batch go through the model once.
    firsts: dict[str, Prepared] = {}
    for item in batch.embed:
        firsts.setdefault(cast(str, item.sha256), item)
    # A Ray run's files come embedded; the rest (all of a local run's) go through the model.
    to_model = [item for item in firsts.values() if item.vector is None]
    dim = run.vectors.dim
    with run.timed("model"):
        embedded = (
            run.embedder.embed_pixels(np.stack([cast(np.ndarray, it.pixels) for it in to_model]))
            if to_model
            else np.empty((0, dim), dtype=np.float32)
        )
    crash_point("model")
    row_of = {cast(str, item.sha256): row for item, row in zip(to_model, embedded, strict=True)}
    row_of.update({sha: item.vector for sha, item in firsts.items() if item.vector is not None})
    good = [_good(item) for item in (*batch.embed, *batch.copy)]
    rows = [row_of[cast(str, item.sha256)] for item in batch.embed]
    rows += [vec for _, (vec, *_) in copies]
    matrix = np.stack(rows) if rows else np.empty((0, dim), dtype=np.float32)
    return good, matrix


def _good(item: Prepared) -> GoodImage:
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
