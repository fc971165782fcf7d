"""VectorCache: an index's FAISS file, a cache of the vectors stored in SQLite.

The file records (in the database) the generation it was built from and what was built
(the plan: type, factory string, training size). It is loaded when that generation matches
the database's and its live ids agree; otherwise it is rebuilt from the stored vectors,
which needs no model, and saved again by whoever holds the write lock.

The cache also owns the index's life as the collection changes (`maintain`: retrain IVF
lists that the collection outgrew, switch type when `auto` would now choose another, drop
tombstones when they pile up) and search with exact re-ranking of approximate scores (the
ranking: search.rerank). How the file is checked against the database: search.verify.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simsearch import config
from simsearch.config import DEFAULT_RERANK, RETRAIN_GROWTH, TOMBSTONE_REBUILD_SHARE
from simsearch.errors import IndexTypeError
from simsearch.fs.lock import WriteLock
from simsearch.search.plan import Plan, ivf_lists, plan_index
from simsearch.search.rerank import rank_candidates, rank_subset
from simsearch.search.vectors import VectorIndex
from simsearch.search.verify import check_same_file, file_problems
from simsearch.storage.manifest import VECTORS_FILE
from simsearch.storage.store import Store

log = logging.getLogger(__name__)

# Vectors drawn at random from the collection to train IVF centroids and PQ codebooks:
# this many per inverted list, and never fewer than 4-bit PQ wants (16 centroids x 39 x 16).
TRAIN_PER_LIST = 50
TRAIN_MIN = 16 * 39 * 16

# A reader during an index run adds at most this many vectors committed since the writer
# last saved its FAISS file (an HNSW graph takes about 10,000 a second); past that it
# searches the saved file as it is.
STALE_ADDED_MAX = 20_000


class VectorCache:
    """The FAISS index of one index folder, loaded or rebuilt on first use."""

    def __init__(
        self, folder: Path, store: Store, dim: int, lock: WriteLock, requested: Callable[[], str]
    ) -> None:
        self.file = Path(folder) / VECTORS_FILE
        self.store = store
        self.dim = dim
        self.lock = lock
        self.requested = requested  # the index type the manifest asks for
        self._vectors: VectorIndex | None = None
        self._built: dict = {}  # what the loaded or built index is: kind, factory, ...
        self._generation = -1  # the database generation the in-memory index reflects
        self.last_rebuild: str | None = None  # why maintain() last rebuilt it
        # Set by a writer between a commit and its mirror here: the index in memory is then
        # behind the database and must not be saved as current.
        self.mirror_pending = False

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, loaded from disk when current, else rebuilt from the store.

        A reader that stays open picks up another process's changes once that writer has
        saved the FAISS file for them (a cheap check per use); it never rebuilds for a
        writer that is still running.
        """
        if self._vectors is not None and not self.lock.held:
            generation, saved = self.store.generations()
            if saved == generation != self._generation:
                self._vectors = None
        if self._vectors is None:
            self._vectors = self._load_or_rebuild(mmap=True)
        return self._vectors

    def begin_write(self) -> None:
        """Call on taking the write lock: forget an in-memory index that another process's
        writes have made stale."""
        if self._vectors is not None and self.store.generation() != self._generation:
            self._vectors = None

    @property
    def built(self) -> dict:
        """What the current index is: {"kind", "factory", "reason", "trained_on", ...}."""
        self.vectors  # noqa: B018 (loads it)
        return dict(self._built)

    def writable(self) -> VectorIndex:
        """The FAISS index in RAM, for a writer (a memory-mapped one is read-only)."""
        return self.in_ram()

    def in_ram(self) -> VectorIndex:
        """The FAISS index read whole into RAM, not memory-mapped: for writers, and for a
        pass over every vector (dedup), which would otherwise fault a mapped HNSW graph in
        page by page, from disk wherever the page cache cannot hold it (15 min instead of
        8 for dedup at 1M x 768 on the development machine)."""
        if self._vectors is not None and self._vectors.mmapped:
            self._vectors = None
        if self._vectors is None:
            self._vectors = self._load_or_rebuild(mmap=False)
        return self._vectors

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Mirror vectors just committed to the database (the caller holds the lock)."""
        self.writable().add(ids, vectors)
        self._generation = self.store.generation()

    def remove(self, ids: np.ndarray) -> int:
        """Mirror removals just committed to the database (the caller holds the lock)."""
        removed = self.writable().remove(ids)
        self._generation = self.store.generation()
        return removed

    def drop(self) -> None:
        """Forget the in-memory index (it may be behind the database); the next use reloads."""
        self._vectors = None

    def _load_or_rebuild(self, *, mmap: bool) -> VectorIndex:
        file = self.file
        generation, saved = self.store.generations()
        vectors = None
        if file.is_file() and saved == generation:
            vectors = self._load_saved(generation, mmap=mmap)
        elif file.is_file() and saved >= 0 and not self.lock.held and self._writer_running():
            # A writer is committing and saves its file every few minutes: rebuilding from
            # the database here would cost every search the whole build (32 s at 200k
            # HNSW vectors) and be stale again at once.
            vectors = self._load_saved(saved, catch_up=True)
        elif generation > 0:
            log.info("rebuilding %s: it is older than the database", file)
        if vectors is not None:
            return vectors
        vectors = self.rebuild()
        # Save the rebuilt file, unless another process is writing (it saves its own).
        if generation > 0:
            if self.lock.held:
                self.save()
            elif self.lock.try_acquire():
                try:
                    if self.store.generation() == generation:
                        self.save()
                finally:
                    self.lock.release()
        return vectors

    def _writer_running(self) -> bool:
        if self.store.read_only:  # nothing writes to read-only storage
            return False
        if self.lock.try_acquire():
            self.lock.release()
            return False
        return True

    def _load_saved(
        self, generation: int, *, mmap: bool = False, catch_up: bool = False
    ) -> VectorIndex | None:
        """The FAISS file, saved at `generation`, if it is the file this index saved and its
        ids are the database's; None if it cannot be used (the caller rebuilds). With
        `catch_up` (a writer is running and has committed since it saved the file): the
        file less what the writer has removed since, plus the images it has committed since
        (up to STALE_ADDED_MAX of them, from the database)."""
        file = self.file
        try:
            built = self.store.faiss_info()
            check_same_file(file, built)
            mmap = mmap and file.stat().st_size >= config.MMAP_MIN_BYTES
            factory = built.get("factory", "Flat")
            vectors = VectorIndex.load(file, self.dim, factory=factory, mmap=mmap)
            if catch_up:
                note = self._catch_up(vectors)
            elif not self._same_ids(vectors, built):
                log.warning("rebuilding %s: its ids differ from the database's", file)
                return None
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("rebuilding %s: %s", file, exc)
            return None
        if catch_up:
            log.warning(
                "an index run is writing to %s: searching %s as it was last saved, %s (images "
                "replaced since keep their old vectors until it saves again)",
                file.parent,
                VECTORS_FILE,
                note,
            )
        self._built, self._generation = built, generation
        return vectors

    def _same_ids(self, vectors: VectorIndex, built: dict) -> bool:
        """Whether the loaded file holds the database's ids (its superseded entries buried)."""
        if built.get("tombstones") == 0 and vectors.tombstones == 0:
            # Saved without tombstones: count and id range from the id index
            # (milliseconds) stand in for reading every id (seconds at 10M);
            # `verify` still compares them all.
            return vectors.id_summary() == self.store.id_summary()
        live = self.store.vector_ids()
        vectors.bury_superseded(live)
        return np.array_equal(vectors.ids(), live)

    def _catch_up(self, vectors: VectorIndex) -> str:
        """Bring a file saved by a running writer up to the database; say how far."""
        live = self.store.vector_ids()
        vectors.bury_superseded(live)
        newest = vectors.id_summary()[2]
        added = live if newest is None else live[live > newest]
        if len(added) > STALE_ADDED_MAX or not vectors.is_trained:
            return f"without the {len(added):,} images committed since"
        stored = self.store.vectors_by_id(added.tolist())
        if stored:
            ids = np.fromiter(stored, dtype=np.int64, count=len(stored))
            vectors.add(ids, np.stack([stored[i] for i in ids.tolist()]))
        return f"plus the {len(added):,} images committed since"

    def rebuild(self, plan: Plan | None = None) -> VectorIndex:
        """Build the FAISS index anew from the stored vectors, and use it from now on."""
        self._vectors = None  # not both in memory at once: a 1M x 768 index is 3 GB
        generation = self.store.generation()
        n = self.store.counts()[0]
        plan = plan or plan_index(self.requested(), n, self.dim)
        vectors = VectorIndex(self.dim, factory=plan.factory)
        trained_on = untrainable_at = 0
        if not vectors.is_trained:
            sample = self._sample(n, max(TRAIN_MIN, TRAIN_PER_LIST * ivf_lists(n)))
            log.info("training %s on %d of %d vectors", plan.factory, len(sample), n)
            try:
                vectors.train(sample)
                trained_on = n
            except IndexTypeError as exc:
                # A factory string that wants more data than there is (e.g. IVF65536 on a
                # few thousand vectors): search exactly until a retry succeeds.
                log.warning("%s; searching exactly until there are more vectors", exc)
                plan = Plan("flat", "Flat", f"{plan.reason}; flat for now: {exc}")
                vectors, untrainable_at = VectorIndex(self.dim), n
        if n > 10_000:
            log.info("building %s (%s) over %d vectors", plan.kind, plan.factory, n)
        for ids, vecs in self.store.iter_vectors(self.dim):
            vectors.add(ids, vecs)
        self._vectors, self._generation = vectors, generation
        self._built = {
            "kind": plan.kind,
            "factory": plan.factory,
            "reason": plan.reason,
            "requested": self.requested(),
            "trained_on": trained_on,
            "untrainable_at": untrainable_at,
        }
        return vectors

    def _sample(self, n: int, size: int) -> np.ndarray:
        """Draw `size` stored vectors uniformly at random (all of them when n <= size).

        The ids come from the small id index and only the drawn rows are read, in id
        order: at 10M x 768 that is ~800 MB read instead of a second 30 GB pass.
        """
        ids = self.store.vector_ids()
        if len(ids) > size:
            ids = np.sort(np.random.default_rng(0).choice(ids, size, replace=False))
        parts = []
        for start in range(0, len(ids), 10_000):
            chunk = ids[start : start + 10_000]
            found = self.store.vectors_by_id(chunk)
            rows = [found[i] for i in chunk.tolist() if i in found]  # some may be gone
            if rows:
                parts.append(np.stack(rows))
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def due(self) -> str | None:
        """Why the index should be rebuilt now, or None when it is fine as it is."""
        # A new type is decided without loading the old index (it would only be dropped).
        built = self._built if self._vectors is not None else self.store.faiss_info()
        if built.get("requested", self.requested()) != self.requested():
            return f"the index type is now {self.requested()!r}"
        vectors, built = self.vectors, self._built
        n = len(vectors)
        plan = plan_index(self.requested(), n, self.dim)
        kind = built.get("kind", "flat")
        untrainable_at = built.get("untrainable_at", 0)
        if plan.kind != kind and not (untrainable_at and n < 2 * untrainable_at):
            return f"{plan.reason}: {kind} -> {plan.kind}"
        trained_on = built.get("trained_on", 0)
        if trained_on and n > RETRAIN_GROWTH * trained_on:
            return f"{n:,} vectors, {n / trained_on:.1f}x the {trained_on:,} it was trained on"
        if vectors.tombstones > TOMBSTONE_REBUILD_SHARE * max(vectors.entries, 1):
            return f"{vectors.tombstones:,} of {vectors.entries:,} entries are tombstones"
        return None

    def maintain(self) -> str | None:
        """Rebuild the index when it is due (the caller holds the write lock); returns why."""
        reason = self.due()
        if reason is not None:
            log.info("rebuilding the vector index: %s", reason)
            self.rebuild()
            self.last_rebuild = reason
        return reason

    def save(self) -> None:
        """Write the FAISS file for the current generation (the caller holds the lock)."""
        if self._vectors is None:
            return
        generation = self.store.generation()
        try:
            self._vectors.save(self.file)
        except Exception as exc:  # disk full, read-only: the database still has everything
            log.warning("cannot save %s (it will be rebuilt next time): %s", VECTORS_FILE, exc)
            return
        st = self.file.stat()
        info = {
            **self._built,
            "tombstones": self._vectors.tombstones,
            # Which file this is: one copied in from elsewhere, or an older one put back,
            # holds other vectors under the same ids, and is rebuilt rather than searched.
            "file": [st.st_size, st.st_mtime_ns],
        }
        self.store.set_faiss_generation(generation, json.dumps(info, sort_keys=True))

    def checkpoint(self) -> None:
        """During a long run: rebuild if due, then save (the caller holds the lock)."""
        self.maintain()
        self.save()

    # -- searching -----------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        within: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), best first. Approximate scores are replaced by exact inner
        products with the stored vectors over a shortlist of k x `rerank` candidates
        (default DEFAULT_RERANK; 0 or 1: no re-ranking). `within`: only these ids (sorted)
        may be returned; a subset of up to config.FILTER_EXACT_MAX is ranked exactly."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if within is not None and len(within) <= config.FILTER_EXACT_MAX:
            return rank_subset(self.store, queries, within, k)
        vectors = self.vectors
        rerank = DEFAULT_RERANK if rerank is None else rerank
        if vectors.exact_scores or rerank <= 1:
            return vectors.search(queries, k, nprobe=nprobe, ef=ef, within=within)
        _, candidates = vectors.search(queries, k * rerank, nprobe=nprobe, ef=ef, within=within)
        return rank_candidates(
            self.store, queries, [row[row >= 0].tolist() for row in candidates], k
        )

    # -- checking ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Return how the FAISS file disagrees with the database (empty: it is current)."""
        return file_problems(self.file, self.store, self.dim)
