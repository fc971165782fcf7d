"""The index run's writer (ops.ingest): each batch in one SQLite transaction, then mirrored
into the FAISS index in memory; and the removal of the files that are gone.

The order keeps the index sound. The database is the truth and FAISS a cache of it: FAISS
changes only after the commit, and `VectorCache.mirror_pending` says so in between (a run
that fails there drops the index in memory rather than save it; the next open rebuilds it
from the database). A Ctrl-C waits until the mirror is done, so an interrupted run can save
the index in memory as current.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from simsearch.fs.faults import crash_point
from simsearch.search.cache import VectorCache
from simsearch.storage.store import BadImage, GoodImage, Known, Moved, Store

log = logging.getLogger(__name__)

# Times a stage of the run: `with timed("database"): ...` (ops.ingest.Stopwatch).
Timer = Callable[[str], contextlib.AbstractContextManager[Any]]


def write_batch(
    store: Store,
    vectors: VectorCache,
    timed: Timer,
    good: Sequence[GoodImage],
    matrix: np.ndarray,
    bad: Sequence[BadImage],
    moves: Sequence[Moved],
) -> list[int]:
    """Write a batch in one transaction, then mirror it to FAISS; return the ids of `good`,
    row for row with `matrix`."""
    # Ctrl-C waits for the commit and its mirror in FAISS: the index in memory then always
    # matches the database, and an interrupted run can save it (`verify` passes after).
    with _interrupt_deferred():
        vectors.mirror_pending = True  # until FAISS has what the database has
        with timed("database"):
            ids, dropped = store.write_batch(good, matrix, bad, moves)
        crash_point("after-commit")
        with timed("faiss"):
            vectors.add(np.asarray(ids, dtype=np.int64), matrix)
            vectors.remove(np.asarray(dropped, dtype=np.int64))
        vectors.mirror_pending = False
    return ids


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


def remove_gone(gone: dict[str, Known], store: Store, vectors: VectorCache) -> int:
    """Remove the files that are gone from the index (database, then FAISS); return how
    many the database had."""
    ids = [row.id for row in gone.values()]
    removed = store.remove_images(ids)
    vectors.remove(np.asarray(ids, dtype=np.int64))
    for key in sorted(gone):
        log.info("removed %s: the file is gone", key)
    return removed
