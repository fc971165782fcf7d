"""VectorCache: an index's FAISS file, a cache of the vectors stored in SQLite.

The file records (in the database) the generation it was built from. It is loaded when that
matches the database's and its ids agree; otherwise it is rebuilt from the stored vectors,
which needs no model, and saved again by whoever holds the write lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from simsearch.config import VECTORS_FILE
from simsearch.lock import WriteLock
from simsearch.store import Store
from simsearch.vectors import VectorIndex

log = logging.getLogger(__name__)


class VectorCache:
    """The FAISS index of one index folder, loaded or rebuilt on first use."""

    def __init__(self, folder: Path, store: Store, dim: int, lock: WriteLock) -> None:
        self.file = Path(folder) / VECTORS_FILE
        self.store = store
        self.dim = dim
        self.lock = lock
        self._vectors: VectorIndex | None = None

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, loaded from disk when current, else rebuilt from the store."""
        if self._vectors is None:
            self._vectors = self._load_or_rebuild()
        return self._vectors

    def drop(self) -> None:
        """Forget the in-memory index (it may be behind the database); the next use reloads."""
        self._vectors = None

    def _load_or_rebuild(self) -> VectorIndex:
        dim, file = self.dim, self.file
        generation, saved = self.store.generations()
        if file.is_file() and saved == generation:
            try:
                vectors = VectorIndex.load(file, dim)
                if np.array_equal(vectors.ids(), self.store.vector_ids()):
                    return vectors
                log.warning("rebuilding %s: its ids differ from the database's", file)
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("rebuilding %s: %s", file, exc)
        elif generation > 0:
            log.info("rebuilding %s: it is older than the database", file)
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

    def rebuild(self) -> VectorIndex:
        """Build the FAISS index anew from the stored vectors, and use it from now on."""
        vectors = VectorIndex(self.dim)
        for ids, vecs in self.store.iter_vectors(self.dim):
            vectors.add(ids, vecs)
        self._vectors = vectors
        return vectors

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
        self.store.set_faiss_generation(generation)

    def problems(self) -> list[str]:
        """Return how the FAISS file disagrees with the database (empty: it is current)."""
        file = self.file
        generation, saved = self.store.generations()
        if not file.is_file():
            return [f"{VECTORS_FILE} is missing"] if generation > 0 else []
        problems = []
        if saved != generation:
            problems.append(
                f"{VECTORS_FILE} is stale: built at generation {saved}, the database is at "
                f"{generation}"
            )
        try:
            vectors = VectorIndex.load(file, self.dim)
        except Exception as exc:
            return [*problems, f"{VECTORS_FILE} is unreadable: {exc}"]
        db_ids, file_ids = self.store.vector_ids(), vectors.ids()
        if len(db_ids) != len(file_ids):
            problems.append(
                f"{VECTORS_FILE} holds {len(file_ids)} vectors, the database {len(db_ids)}"
            )
        elif not np.array_equal(db_ids, file_ids):
            problems.append(f"the ids in {VECTORS_FILE} differ from the database's")
        else:
            differ = 0
            for ids, vecs in vectors.items():
                stored = self.store.vectors_by_id(ids)
                differ += sum(
                    1
                    for i, v in zip(ids.tolist(), vecs, strict=True)
                    if i not in stored or not np.allclose(stored[i], v, atol=1e-6)
                )
            if differ:
                problems.append(f"{differ} vectors in {VECTORS_FILE} differ from the database's")
        return problems
