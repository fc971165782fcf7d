"""An IVF-PQ index whose inverted lists live on disk: trained on a sample, filled one shard
at a time (each shard its own index, so the fills can run anywhere in parallel), merged
with FAISS's `merge_ondisk` into one index file and one `.ivfdata` file, which readers
memory-map (FAISS's OnDiskInvertedLists): a searcher's memory is the coarse quantiser and
the pages it touches, whatever the collection's size.

The folder (`OnDiskIndex.open` reads it):

    manifest.json     what was built: format, dim, rows, factory, shards, settings
    index.faiss       the trained index, its lists' offsets into index.ivfdata
    index.ivfdata     the PQ codes and row numbers of every inverted list
    vectors.npy       the vectors (float16, n x dim) in row order, for exact re-ranking
    ids.npy           row -> id (int64)
    paths.bin         the paths' bytes, end to end; path_offsets.npy: where row i's begins

FAISS stores row numbers, not ids: re-ranking then reads a candidate's vector at its row
(one seek into a float16 .npy; a parquet row would cost decoding its whole page), and ids
need no hash table in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.config import DEFAULT_NPROBE, DEFAULT_RERANK, IVF_TRAIN_ITERATIONS
from simsearch.errors import ShardError
from simsearch.records import Hit
from simsearch.search.plan import ivf_lists, pq_codes
from simsearch.search.vectors import faiss_message

FORMAT = "simsearch-ondisk-ivfpq"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
PATHS_FILE = "paths.bin"
PATH_OFFSETS_FILE = "path_offsets.npy"

# From this many lists the coarse quantiser is an HNSW graph over the centroids: assigning
# a vector to its list costs ~log(nlist) distances instead of nlist (at 4096 lists and 768
# dims, the exact assignment was most of a fill's time).
HNSW_COARSE_MIN_LISTS = 1024
# Training vectors per inverted list (FAISS warns below 39), and never fewer than 8-bit PQ
# wants for its 256 centroids per sub-quantiser.
TRAIN_PER_LIST = 40
PQ_CENTROIDS = 256  # per sub-quantiser of 8-bit codes: the fewest vectors PQ trains on
TRAIN_MIN = 256 * 39
# Candidates kept while walking the centroids' graph to pick a query's lists (at least twice
# nprobe): 4,096 centroids, so a wide walk costs little next to scanning the lists.
COARSE_EF = 64


def choose_factory(n: int, dim: int, nlist: int | None = None, m: int | None = None) -> str:
    """The FAISS factory string for `n` vectors: ~4 sqrt(n) lists (at most 4096), one
    8-bit PQ code per ~8 dimensions. 8-bit codes, not 4-bit fast-scan ones: fast-scan
    lists are blocks held in RAM, which OnDiskInvertedLists cannot hold."""
    nlist = nlist or ivf_lists(n)
    m = m or pq_codes(dim)
    if nlist < 1 or m < 1 or dim % m:
        raise ShardError(
            f"PQ{m} needs a number of codes that divides the dimension {dim}", param="m"
        )
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_MIN_LISTS else f"IVF{nlist}"
    return f"{coarse},PQ{m}"


def sample_size(factory: str, n: int) -> int:
    """Vectors to train `factory` on: TRAIN_PER_LIST per list, at least TRAIN_MIN, at
    most all `n`."""
    return min(n, max(TRAIN_PER_LIST * lists_of(factory), TRAIN_MIN))


def lists_of(factory: str) -> int:
    """The number of inverted lists of an "IVF{n}[_...],..." factory string."""
    return int(factory.split(",")[0][3:].split("_")[0])


def train(factory: str, dim: int, sample: np.ndarray):
    """An empty index of `factory` (inner product), trained on the unit vectors `sample`."""
    import faiss

    lists = lists_of(factory)
    if len(sample) < lists:
        raise ShardError(
            f"{len(sample)} training vectors cannot train {lists} lists: give fewer lists "
            "or a larger sample",
            param="nlist",
        )
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # FAISS's stubs lack cp
    ivf.cp.niter = IVF_TRAIN_ITERATIONS
    if isinstance(ivf, faiss.IndexIVFPQ):
        # FAISS's 25 k-means iterations per codebook barely move them; and the factory's
        # polysemous training (for Hamming-filtered search, not used here) took 99 % of
        # the training time at 768 dims.
        ivf.pq.cp.niter = IVF_TRAIN_ITERATIONS
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as exc:  # e.g. fewer than 256 vectors for 8-bit PQ codebooks
        why = faiss_message(exc)
        if len(sample) < PQ_CENTROIDS:
            why += (
                f". Its codes need at least {PQ_CENTROIDS} vectors to train on: a collection "
                "this small needs no on-disk index (an index searches it exactly)"
            )
        raise ShardError(
            f"{factory} cannot be trained on {len(sample):,} vectors: {why}", param="sample"
        ) from None
    return index


def fill_shard(trained: str, shard, dim: int, out: str, batch_rows: int) -> int:
    """Add one shard's vectors (labelled by row number) to a copy of the trained index read
    from `trained`, and write it to `out`; returns how many. One task of a build: it reads
    and writes only files, so it runs as well in a Ray worker as in this process."""
    import faiss

    from simsearch.search.shards import read_batches

    index = faiss.read_index(trained)
    for batch in read_batches(shard, dim, batch_rows):
        index.add_with_ids(batch.vectors, batch.rows)
    faiss.write_index(index, out)
    return int(index.ntotal)


def merge(trained: str, shard_indexes: list[str], folder: Path) -> int:
    """Merge the filled shard indexes into `folder`/index.faiss and index.ivfdata (the
    lists on disk); returns the number of vectors."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(trained)
    merge_ondisk(index, shard_indexes, str(folder / IVFDATA_FILE))
    faiss.write_index(index, str(folder / INDEX_FILE))
    return int(index.ntotal)


# Past this many rows the lists hold more near neighbours than 16 of them and 10 x k
# candidates find: measured (benchmarks/shard_build.py, docs/benchmarks.md) recall@10 0.986
# at 1M with nprobe 16 and re-rank 10, but 0.861 at 10M, where nprobe 128 and re-rank 20
# gave 0.969 (p50 13.8 ms).
LARGE_ROWS = 2_000_000
LARGE_NPROBE_SHARE = 32  # nprobe = lists / 32 past LARGE_ROWS (128 of 4,096)
LARGE_RERANK = 20


def default_settings(rows: int, nlist: int) -> tuple[int, int]:
    """(nprobe, rerank) for an index of `rows` vectors in `nlist` lists."""
    if rows <= LARGE_ROWS:
        return DEFAULT_NPROBE, DEFAULT_RERANK
    return max(DEFAULT_NPROBE, nlist // LARGE_NPROBE_SHARE), max(DEFAULT_RERANK, LARGE_RERANK)


@contextlib.contextmanager
def _stdout_silenced():
    """Send what C code writes to file descriptor 1 to /dev/null meanwhile: FAISS prints
    "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..." there on every open, which
    would corrupt a command's --json output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class Found:
    """One query's hits, and the rows they came from."""

    hits: list[Hit]
    rows: np.ndarray


class OnDiskIndex:
    """A built folder, opened read-only: the lists and vectors memory-mapped."""

    def __init__(self, folder: Path, manifest: dict, index, vectors, ids, paths, offsets):
        self.folder = folder
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self._index = index
        self._ivf = _extract_ivf(index)
        import faiss

        quantizer = faiss.downcast_index(self._ivf.quantizer)
        self._coarse_hnsw = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
        self.vectors = vectors
        self.ids = ids
        self._paths = paths
        self._offsets = offsets

    @classmethod
    def open(cls, folder: str | os.PathLike) -> OnDiskIndex:
        """Open a folder that `simsearch.ops.shards.build` made; ShardError if it is not one
        or its files disagree with its manifest."""
        import faiss

        folder = Path(folder).absolute()
        manifest = _read_manifest(folder)
        rows, dim = int(manifest["rows"]), int(manifest["dim"])
        flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR
        try:
            with _stdout_silenced():  # FAISS prints where it found the lists, on stdout
                index = faiss.read_index(str(folder / INDEX_FILE), flags)
        except RuntimeError as exc:
            raise ShardError(f"{folder / INDEX_FILE} cannot be read: {exc}", path=folder) from None
        lists = faiss.downcast_InvertedLists(_extract_ivf(index).invlists)
        if not isinstance(lists, faiss.OnDiskInvertedLists) or index.ntotal != rows:
            raise ShardError(
                f"{folder / INDEX_FILE} is not the on-disk index of {rows} vectors its "
                "manifest describes",
                path=folder,
            )
        vectors = _load(folder / VECTORS_FILE, (rows, dim), np.float16)
        _random_access(vectors)
        ids = _load(folder / IDS_FILE, (rows,), np.int64)
        offsets = _load(folder / PATH_OFFSETS_FILE, (rows + 1,), np.int64)
        paths = np.memmap(folder / PATHS_FILE, dtype=np.uint8, mode="r") if offsets[-1] else None
        return cls(folder, manifest, index, vectors, ids, paths, offsets)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def row_of(self, id: int) -> int:
        """The row of an id (a scan of ids.npy in chunks: 80 MB at 10M); KeyError if none."""
        step = 1 << 20
        for start in range(0, len(self.ids), step):
            found = np.flatnonzero(self.ids[start : start + step] == id)
            if len(found):
                return start + int(found[0])
        raise KeyError(id)

    def vector(self, row: int) -> np.ndarray:
        return np.asarray(self.vectors[row], dtype=np.float32)

    def path(self, row: int) -> str:
        if self._paths is None:
            return ""
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        return os.fsdecode(self._paths[start:end].tobytes())

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> list[Found]:
        """The `k` nearest rows of each query (unit vectors or not: they are normalised):
        `nprobe` lists visited, then the best k * `rerank` by PQ score re-ranked by exact
        inner product on the stored vectors (rerank 0: the PQ scores as they are). None:
        by the index's size (`default_settings`)."""
        auto_nprobe, auto_rerank = default_settings(len(self), self._ivf.nlist)
        nprobe = auto_nprobe if nprobe is None else nprobe
        rerank = auto_rerank if rerank is None else rerank
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ShardError(
                f"queries are {queries.shape[1]}-dim, the index {self.dim}-dim", param="queries"
            )
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        if not np.isfinite(queries).all() or (norms <= 0).any():
            raise ShardError("a query vector is zero or not finite", param="queries")
        queries = np.ascontiguousarray(queries / norms)
        self._ivf.nprobe = max(1, min(nprobe, self._ivf.nlist))
        if self._coarse_hnsw is not None:  # finding nprobe lists well takes a wider walk
            self._coarse_hnsw.hnsw.efSearch = max(COARSE_EF, 2 * self._ivf.nprobe)
        wanted = min(len(self), k * max(rerank, 1))
        scores, rows = self._index.search(queries, wanted)
        found = []
        for query, row_scores, candidates in zip(queries, scores, rows, strict=True):
            keep = candidates >= 0
            row_scores, candidates = row_scores[keep], candidates[keep]
            if rerank and len(candidates):
                order = np.argsort(candidates)  # ascending rows: the reads go forward
                exact = np.asarray(self.vectors[candidates[order]], dtype=np.float32) @ query
                row_scores, candidates = exact, candidates[order]
            best = np.argsort(-row_scores, kind="stable")[:k]
            picked = candidates[best]
            hits = [
                Hit(int(self.ids[r]), self.path(int(r)), float(s))
                for r, s in zip(picked, row_scores[best], strict=True)
            ]
            found.append(Found(hits, picked))
        return found


def _random_access(array: np.ndarray) -> None:
    """Tell the kernel that re-ranking reads rows at random places: no read-ahead, so a
    1.5 KB row costs one page from disk, not the 128 KB around it."""
    import mmap

    mapped = getattr(array, "_mmap", None)  # np.memmap keeps its mmap there
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)


def _extract_ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def _read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST_FILE
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.loads(fh.read(1 << 20))
    except FileNotFoundError:
        raise ShardError(
            f"{folder} is not an on-disk index (no {MANIFEST_FILE})", path=folder
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{file} cannot be read: {exc}", path=folder) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{folder} is not an on-disk index", path=folder)
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{folder} is an on-disk index of version {manifest.get('version')}, this "
            f"simsearch reads version {FORMAT_VERSION}",
            path=folder,
        )
    return manifest


def _load(file: Path, shape: tuple, dtype) -> np.ndarray:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{file} cannot be read: {exc}", path=file) from None
    if array.shape != shape or array.dtype != dtype:
        raise ShardError(
            f"{file} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}",
            path=file,
        )
    return array
