"""VectorIndex: a FAISS index of any type over unit vectors, keyed by integer image ids.

Every index is `IndexIDMap(inner)`: the id map holds the image id of each stored entry
(entries are numbered in the order they were added), `inner` is whatever the plan asks for:
exact (Flat), a graph (HNSW), inverted lists (IVF), compressed codes (IVF-PQ) or any FAISS
factory string. Only a Flat index can remove entries in place; for every other type a
removed or replaced entry becomes a tombstone, skipped at query time by a bitmap selector,
until a rebuild drops them all.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from simsearch.config import (
    AUTO_FLAT_MAX_VECTORS,
    AUTO_HNSW_MAX_BYTES,
    DEFAULT_EF,
    DEFAULT_NPROBE,
    FILTER_MAX_EF,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVF_MAX_LISTS,
    IVF_TRAIN_ITERATIONS,
    IVF_TRAIN_PER_LIST,
    PQ_DIMS_PER_CODE,
)
from simsearch.errors import IndexTypeError
from simsearch.fs.files import replaced_atomically

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The FAISS index to build for a collection of `n` vectors, and why."""

    kind: str  # flat | hnsw | ivf | ivfpq | factory
    factory: str  # the FAISS index_factory string
    reason: str  # one line a user can read: what was asked, what was chosen, why
    min_train: int = 0  # vectors needed to train it (0: needs no training)


def ivf_lists(n: int) -> int:
    """Inverted lists for `n` vectors: ~4 sqrt(n) (FAISS's rule of thumb), at least 39
    training vectors each, at most IVF_MAX_LISTS."""
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST, IVF_MAX_LISTS))


def pq_codes(dim: int) -> int:
    """PQ sub-quantisers: about dim / PQ_DIMS_PER_CODE but at least 16 (small vectors need
    finer codes), an even number dividing dim (4-bit fast-scan codes pack two per byte)."""
    target = min(dim, max(16, dim // PQ_DIMS_PER_CODE))
    return max(m for m in range(2, target + 1, 2) if dim % m == 0)


def plan_index(requested: str, n: int, dim: int) -> Plan:
    """Decide what to build for `requested` (a name from INDEX_TYPES or a factory string)."""
    requested = requested.strip()
    name = requested.lower()
    if name == "auto":
        if n <= AUTO_FLAT_MAX_VECTORS:
            reason = f"auto: exact search, fast enough up to {AUTO_FLAT_MAX_VECTORS:,} vectors"
            return _plan("flat", n, dim, reason)
        # The count is the one the choice was made at: the reason is kept with the build.
        if n * dim * 4 <= AUTO_HNSW_MAX_BYTES:
            reason = f"auto: chosen at {n:,} vectors, a graph answers in ~2 ms"
            return _plan("hnsw", n, dim, reason)
        return _plan(
            "ivfpq",
            n,
            dim,
            f"auto: chosen at {n:,} vectors, which would take {n * dim * 4 / 2**30:.1f} GiB "
            "uncompressed; compressed codes with exact re-ranking",
        )
    if name in INDEX_TYPES:
        return _plan(name, n, dim, f"{name} as requested")
    check_factory(requested, dim)
    return Plan("factory", requested, f"FAISS factory {requested!r} as requested")


def _plan(kind: str, n: int, dim: int, reason: str) -> Plan:
    if kind == "flat":
        return Plan("flat", "Flat", reason)
    if kind == "hnsw":
        return Plan("hnsw", f"HNSW{HNSW_M}", reason)
    # IVF types need training data; below that, exact search stands in until there is enough.
    lists = ivf_lists(n)
    if kind == "ivf":
        factory, min_train = f"IVF{lists},Flat", IVF_TRAIN_PER_LIST
    else:
        factory, min_train = f"IVF{lists},PQ{pq_codes(dim)}x4fs", 16 * IVF_TRAIN_PER_LIST
    if n < min_train:
        return Plan("flat", "Flat", f"{reason}; flat until {min_train:,} vectors to train it")
    return Plan(kind, factory, reason, min_train)


def check_factory(factory: str, dim: int) -> None:
    """Raise IndexTypeError unless FAISS builds `factory` for `dim`-dim vectors (cheap: an
    empty index; `try_index_type` also uses it)."""
    import faiss

    if not re.fullmatch(r"[A-Za-z0-9_,.=x]+", factory):
        raise IndexTypeError(f"{factory!r} is not an index type ({', '.join(INDEX_TYPES)})")
    if re.match(r"IDMap", factory, re.IGNORECASE):
        raise IndexTypeError(
            f"{factory!r}: simsearch maps image ids itself; give the index without IDMap "
            f"(e.g. {factory.split(',', 1)[-1]!r})"
        )
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = _faiss_message(exc)
        raise IndexTypeError(
            f"{factory!r} is neither an index type ({', '.join(INDEX_TYPES)}) nor a FAISS "
            f"factory string for {dim}-dim vectors: {detail}"
        ) from None


# Vectors a factory string is tried on before it is saved as an index's type.
TRIAL_VECTORS = 2048


def try_index_type(requested: str, dim: int, timeout: float = 300.0) -> None:
    """Raise IndexTypeError unless a FAISS factory string `requested` trains, adds, removes,
    searches, saves and loads on TRIAL_VECTORS random vectors; the named types are known
    to. Tried in a child process: FAISS checks some parameters with C++ assertions that
    abort the whole process (HNSW0 did, and every later command on that index too)."""
    import signal
    import subprocess
    import sys

    if requested.strip().lower() in INDEX_TYPES:
        return
    check_factory(requested, dim)
    code = (
        "import sys; from simsearch.search.vectors import _trial; "
        "_trial(sys.argv[1], int(sys.argv[2]))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, requested, str(dim)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise IndexTypeError(
            f"{requested!r}: trying it on {TRIAL_VECTORS:,} vectors took over {timeout:.0f} s"
        ) from None
    if done.returncode == 0:
        if done.stdout.strip():
            log.warning("%s", done.stdout.strip())
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode < 0 or done.returncode == 134:
        number = -done.returncode if done.returncode < 0 else signal.SIGABRT
        why = f"FAISS aborted ({signal.Signals(number).name})"
        detail = next((line for line in lines if "assert" in line.lower()), "")
        why += f": {detail.split(' in ')[0].strip()}" if detail else ""
    else:
        why = lines[-1] if lines else f"exit status {done.returncode}"
    raise IndexTypeError(
        f"{requested!r} is not a usable index type: tried on {TRIAL_VECTORS:,} random "
        f"{dim}-dim vectors, {why}"
    )


def _trial(factory: str, dim: int) -> None:
    """Put `factory` through what an index does (see try_index_type); in a child process."""
    import sys
    import tempfile

    rng = np.random.default_rng(0)
    data = rng.standard_normal((TRIAL_VECTORS, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(1, TRIAL_VECTORS + 1, dtype=np.int64)
    try:
        index = VectorIndex(dim, factory=factory)
        if not index.is_trained:
            try:
                index.train(data)
            except IndexTypeError as exc:
                if "at least as large as number of clusters" not in str(exc):
                    raise
                # Built, but too many lists to train on a trial's vectors: the rest of the
                # trial waits for the collection (training then says if it is too small).
                print(f"{factory}: checked as far as training, which needs more vectors")
                return
        index.add(ids, data)
        index.remove(ids[:10])
        index.search(data[:5], 10)
        with tempfile.TemporaryDirectory() as folder:
            index.save(Path(folder) / "trial.faiss")
            loaded = VectorIndex.load(Path(folder) / "trial.faiss", dim, factory=factory)
            loaded.search(data[:5], 10)
    except Exception as exc:  # any failure is the answer
        print(f"{type(exc).__name__}: {_faiss_message(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


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
            detail = _faiss_message(exc)
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


def _faiss_message(exc: Exception) -> str:
    """The reason in a FAISS exception, without its C++ function and file location."""
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
