"""VectorIndex: a FAISS index of any type over unit vectors, keyed by integer image ids.

Every index is `IndexIDMap(inner)`: the id map holds the image id of each stored entry
(entries are numbered in the order they were added), `inner` is whatever the plan (search.plan)
asks for: exact (Flat), a graph (HNSW), inverted lists (IVF), compressed codes (IVF-PQ) or
any FAISS factory string. Only a Flat index can remove entries in place; for every other type a
removed or replaced entry becomes a tombstone, skipped at query time by a bitmap selector,
until a rebuild drops them all.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from pathlib import Path
from typing import cast

import numpy as np

from simsearch.config import (
    DEFAULT_EF,
    DEFAULT_NPROBE,
    FILTER_MAX_EF,
    HNSW_EF_CONSTRUCTION,
    IVF_TRAIN_ITERATIONS,
    IVF_TRAIN_PER_LIST,
)
from simsearch.errors import IndexTypeError
from simsearch.fs.files import replaced_atomically

log = logging.getLogger(__name__)


class VectorIndex:
    """Cosine search (inner product on unit vectors) with caller-chosen int64 ids."""

    def __init__(self, dim: int, index=None, *, factory: str = "Flat", mmapped: bool = False):
        import faiss

        self.dim = dim
        self.factory = factory
        self.mmapped = mmapped
        if index is None:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            hnsw = _hnsw(inner)
            if hnsw is not None:
                hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            # IDMap (not IDMap2): no id -> entry hash table, ~40 bytes a vector saved.
            index = faiss.IndexIDMap(inner)
        self._index = index
        self._inner = faiss.downcast_index(index.index)
        self._dead = np.zeros(index.ntotal, dtype=bool)
        self._n_dead = 0
        self._selector = None
        self._label_copy: np.ndarray | None = None

    # -- what it is ----------------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def removable(self) -> bool:
        """True when entries can be removed in place (Flat); others keep tombstones."""
        import faiss

        return isinstance(self._inner, faiss.IndexFlat)

    @property
    def exact_scores(self) -> bool:
        """True when search returns exact inner products (no re-ranking needed)."""
        import faiss

        inner = self._inner
        if isinstance(inner, faiss.IndexHNSW):
            inner = faiss.downcast_index(inner.storage)
        return isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat)

    def __len__(self) -> int:
        """The number of live vectors (entries that are not tombstones)."""
        return int(self._index.ntotal) - self._n_dead

    @property
    def entries(self) -> int:
        """Stored entries, tombstones included."""
        return int(self._index.ntotal)

    @property
    def tombstones(self) -> int:
        return self._n_dead

    def _labels(self) -> np.ndarray:
        """The id of each entry (a copy of the id map, kept until the index changes)."""
        import faiss

        if self._label_copy is None:
            self._label_copy = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return self._label_copy

    def ids(self) -> np.ndarray:
        """Return the ids of the live vectors, sorted."""
        return np.sort(self._labels()[~self._dead])

    def id_summary(self) -> tuple[int, int | None, int | None]:
        """Return (count, smallest id, largest id) of the live vectors, without sorting."""
        live = self._labels()[~self._dead]
        if len(live) == 0:
            return 0, None, None
        return len(live), int(live.min()), int(live.max())

    def items(self, chunk: int = 65_536):
        """Yield (ids, vectors) chunks of the live entries, as the index holds them (lossy
        for compressed types)."""
        import faiss

        labels = self._labels()
        inner = self._inner
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            ivf.make_direct_map()
        for start in range(0, len(labels), chunk):
            n = min(chunk, len(labels) - start)
            keep = ~self._dead[start : start + n]
            vecs = inner.reconstruct_n(start, n)
            yield labels[start : start + n][keep], vecs[keep]

    # -- changing ------------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Train the index (IVF centroids, PQ codebooks) on a sample of the collection."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self._inner)
        if ivf is not None:
            ivf.cp.niter = IVF_TRAIN_ITERATIONS
            advised = IVF_TRAIN_PER_LIST * ivf.nlist
            if len(sample) < advised:  # say it here, not in FAISS's own line on stderr
                log.warning(
                    "%s: %d training vectors for %d lists (FAISS advises %d); the lists may "
                    "be uneven",
                    self.factory,
                    len(sample),
                    ivf.nlist,
                    advised,
                )
                ivf.cp.min_points_per_centroid = 1
        try:
            self._index.train(self._check(sample))
        except RuntimeError as exc:
            detail = faiss_message(exc)
            raise IndexTypeError(
                f"cannot train {self.factory} on {len(sample):,} vectors: {detail}"
            ) from None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids`, replacing any vector already stored under one of them."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        vectors = self._check(vectors)
        if not self.is_trained:
            raise RuntimeError(f"the {self.factory} index must be trained before adding")
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)
        self._dead = np.concatenate([self._dead, np.zeros(len(ids), dtype=bool)])
        self._selector = self._label_copy = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors stored under `ids`; returns how many there were."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0 or len(self) == 0:
            return 0
        gone = np.isin(self._labels(), ids)
        if self.removable:
            # Every entry of these ids goes, tombstones of them included; the tombstones
            # of other ids stay so (FAISS keeps the remaining entries in order).
            removed = int((gone & ~self._dead).sum())
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._dead = self._dead[~gone]
            self._n_dead = int(self._dead.sum())
            self._label_copy = None
            self._selector = None
            return removed
        return self._bury(gone)

    def bury_superseded(self, live_ids: np.ndarray) -> int:
        """Mark as tombstones the entries whose id is not in `live_ids` (sorted) and all but
        the last entry of each id: what a loaded file must skip. Returns how many."""
        labels = self._labels()
        if len(labels) == 0:
            return 0
        dead = ~np.isin(labels, live_ids)
        # An id added again after a replacement: its later entry is the current one.
        _, last_from_end = np.unique(labels[::-1], return_index=True)
        latest = np.zeros(len(labels), dtype=bool)
        latest[len(labels) - 1 - last_from_end] = True
        return self._bury(dead | ~latest)

    def _bury(self, mask: np.ndarray) -> int:
        new = mask & ~self._dead
        count = int(new.sum())
        if count:
            self._dead |= new
            self._n_dead += count
            self._selector = None
        return count

    # -- searching -----------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef: int | None = None,
        within: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each (n, k'), best first; k' = min(k, len(self)).

        Approximate types may find fewer than k' neighbours for a query; the missing places
        have id -1. `nprobe` (IVF lists visited) and `ef` (HNSW candidate list) trade speed
        for recall. `within`: only these ids may be returned (a filter applied inside the
        search, so k results come back whenever k of them exist).
        """
        import faiss

        queries = self._check(np.atleast_2d(queries))
        k = min(k, len(self))
        if k <= 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        params = self._params(k, nprobe, ef)
        if within is not None:
            allowed = np.isin(self._labels(), within) & ~self._dead
            share = max(int(allowed.sum()), 1) / max(len(allowed), 1)
            # The nearest allowed entries lie further out the smaller their share: widen
            # the graph walk or the lists visited in proportion.
            if isinstance(params, faiss.SearchParametersHNSW):  # type: ignore[attr-defined]
                params.efSearch = int(min(params.efSearch / share, FILTER_MAX_EF))
            elif isinstance(params, faiss.SearchParametersIVF):
                ivf = faiss.try_extract_index_ivf(self._inner)
                assert ivf is not None  # _params makes IVF parameters for an IVF index only
                nlist = ivf.nlist
                params.nprobe = int(min(math.ceil(params.nprobe / share), nlist))
            params = _with_selector(params, allowed)
        scores, positions = self._inner.search(queries, k, params=params)
        labels = self._labels()
        ids = np.where(positions >= 0, labels[np.maximum(positions, 0)], -1)
        return scores, ids

    def _params(self, k: int, nprobe: int | None, ef: int | None):
        import faiss

        selector = self._live_selector()
        hnsw, ivf = _hnsw(self._inner), faiss.try_extract_index_ivf(self._inner)
        if hnsw is not None:
            params = faiss.SearchParametersHNSW(efSearch=max(ef or DEFAULT_EF, k))  # type: ignore[attr-defined]
        elif ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe or DEFAULT_NPROBE, ivf.nlist))  # type: ignore[call-arg]
        elif selector is None:
            return None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params

    def _live_selector(self):
        """A FAISS selector of the live entries, or None when there are no tombstones."""
        import faiss

        if self._n_dead == 0:
            return None
        if self._selector is None:
            bits = np.packbits(~self._dead, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(self._dead), faiss.swig_ptr(bits))
            selector.bits_ref = bits  # the selector points into this array: keep it alive
            self._selector = selector
        return self._selector

    # -- files ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically: a reader sees the old file or the new one."""
        import faiss

        with replaced_atomically(Path(path), crash_point_name="faiss-write") as tmp:
            faiss.write_index(self._index, str(tmp))

    @classmethod
    def load(cls, path: Path, dim: int, *, factory: str = "Flat", mmap: bool = False):
        """Read an index file; `mmap` maps its vectors or codes instead of reading them, so
        a big index opens at once and shares the page cache (it is then read-only)."""
        import faiss

        check_header(Path(path), dim)
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        index = faiss.read_index(str(path), flags)
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dim vectors, expected {dim}")
        if not isinstance(index, faiss.IndexIDMap):  # or IDMap2, as older files are
            raise ValueError(f"{path} is not an id-mapped index")
        ivf = faiss.try_extract_index_ivf(index.index)
        if ivf is not None and isinstance(
            faiss.downcast_InvertedLists(cast("faiss.InvertedLists", ivf.invlists)),
            faiss.BlockInvertedLists,  # type: ignore[attr-defined]
        ):
            mmap = False  # fast-scan lists are always read into RAM (they are small)
        return cls(dim, index, factory=factory, mmapped=mmap)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        return vectors


# FAISS's index header after the four-byte type code: d (int32), ntotal (int64), two unused
# int64s, is_trained (a byte), metric_type (int32), and a float metric_arg for metrics > 1.
_HEADER = struct.Struct("<iqqqBi")
_ID_MAPS = (b"IxMp", b"IxM2")
_FLATS = (b"IxFI", b"IxF2", b"IxFl")


def check_header(path: Path, dim: int) -> None:
    """Raise ValueError unless the FAISS file at `path` is an id map over `dim`-dim vectors
    whose header claims no more than the file holds. FAISS allocates what a header claims
    before it reads it: a 498-byte file claiming 3e9 codes cost 3 GB before failing."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4 + _HEADER.size + 4 + 4 + _HEADER.size + 4 + 8)
    if len(head) < 4 + _HEADER.size or head[:4] not in _ID_MAPS:
        raise ValueError(f"{path} is not an id-mapped FAISS index")
    d, ntotal, _, _, _, metric = _HEADER.unpack_from(head, 4)
    if d != dim:
        raise ValueError(f"{path} holds {d}-dim vectors, expected {dim}")
    if ntotal < 0 or 8 * ntotal > size:  # the id map alone takes 8 bytes a vector
        raise ValueError(f"{path} claims {ntotal:,} vectors but is {size:,} bytes")
    inner = 4 + _HEADER.size + (4 if metric > 1 else 0)
    if head[inner : inner + 4] in _FLATS and len(head) >= inner + 4 + _HEADER.size + 8:
        _, inner_total, _, _, _, inner_metric = _HEADER.unpack_from(head, inner + 4)
        at = inner + 4 + _HEADER.size + (4 if inner_metric > 1 else 0)
        (floats,) = struct.unpack_from("<Q", head + b"\0" * 8, at)  # written as floats
        if floats != d * inner_total or 4 * floats > size:
            raise ValueError(
                f"{path} claims {floats:,} vector values for {inner_total:,} vectors of "
                f"{d} dimensions, in a file of {size:,} bytes"
            )


def faiss_message(exc: Exception) -> str:
    """The reason in a FAISS exception, without its C++ function and file location (for
    messages here and in search.plan)."""
    text = str(exc).strip().splitlines()[-1]
    return re.split(r"(?:Error: |' failed: )", text)[-1].strip()


def _with_selector(params, allowed: np.ndarray):
    """`params` (or new ones) selecting the entries where `allowed` is True."""
    import faiss

    bits = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    selector.bits_ref = bits  # type: ignore[attr-defined]  # it points into bits: keep them alive
    params = params if params is not None else faiss.SearchParameters()
    params.sel = selector
    params.sel_ref = selector
    return params


def _hnsw(index):
    """The HNSW graph structure of `index`, or None when it is not an HNSW index."""
    import faiss

    index = faiss.downcast_index(index)
    return index.hnsw if isinstance(index, faiss.IndexHNSW) else None
