"""VectorIndex: a FAISS inner-product index over unit vectors, keyed by integer image ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simsearch.files import replaced_atomically


class VectorIndex:
    """Exact cosine search (inner product on unit vectors) with caller-chosen int64 ids."""

    def __init__(self, dim: int, index=None) -> None:
        import faiss

        self.dim = dim
        # IDMap2 keeps the id of each row, so ids equal the database's image ids and a
        # single id can be replaced or removed.
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Return the stored ids, sorted."""
        import faiss

        return np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))

    def items(self, chunk: int = 65_536):
        """Yield (ids, vectors) chunks of everything stored, in storage order."""
        import faiss

        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        inner = self._index.index
        for start in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - start)
            yield ids[start : start + n], inner.reconstruct_n(start, n)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids`, replacing any vector already stored under one of them."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        vectors = self._check(vectors)
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors stored under `ids`; returns how many there were."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0 or len(self) == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each (n, k'), best first; k' = min(k, len(self))."""
        queries = self._check(np.atleast_2d(queries))
        k = min(k, len(self))
        if k <= 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically: a reader sees the old file or the new one."""
        import faiss

        with replaced_atomically(Path(path), crash_point_name="faiss-write") as tmp:
            faiss.write_index(self._index, str(tmp))

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        import faiss

        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dim vectors, expected {dim}")
        return cls(dim, index)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        return vectors
