"""Search at scale: build time, memory, latency, throughput and recall of each index type.

Makes an index folder holding N synthetic clustered unit vectors (stored through
simsearch's own Store, as indexing would), then for each index type, in fresh processes:
builds it (`Index.set_index_type`, from the stored vectors, as a user's index would be),
loads it and measures resident memory, single-query latency (p50/p99 through
`Index.search_many`, paths included) and batch throughput, and recall@10 against exact
search, with and without re-ranking on the stored vectors.

    python benchmarks/search_scale.py --n 1000000 --types flat,hnsw,ivf,ivfpq
    python benchmarks/search_scale.py --n 10000000 --types ivfpq --work /data/bench-10m

The data: groups of vectors, each spread along 8 directions of its own plus a little noise
(low intrinsic dimension, like image embeddings; at 1M a query's nearest neighbour scores
0.92 on average and its 10th 0.83). The work folder is kept and reused (the vectors take
N x dim x 4 bytes in SQLite). Results are printed as JSON lines and recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 20_000  # vectors generated and written per step: bounded memory at any N


def clustered(start: int, count: int, dim: int, groups: int, seed: int) -> np.ndarray:
    """Vectors start..start+count of the collection (the same vectors whatever the chunking)."""
    fixed = np.random.default_rng(12345)
    centres = (fixed.standard_normal((groups, dim)) / np.sqrt(dim)).astype(np.float32)
    bases = (fixed.standard_normal((groups, 8, dim)) / np.sqrt(dim)).astype(np.float32)
    out = np.empty((count, dim), dtype=np.float32)
    for offset in range(0, count, CHUNK):
        n = min(CHUNK, count - offset)
        rng = np.random.default_rng([seed, (start + offset) // CHUNK])
        group = rng.integers(0, groups, n)
        z = (0.7 * rng.standard_normal((n, 8))).astype(np.float32)
        x = centres[group] + np.einsum("nr,nrd->nd", z, bases[group])
        x += (0.15 / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
        out[offset : offset + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def prepare(work: Path, n: int, dim: int, queries: int) -> None:
    """Write the index folder, the queries and the exact top-10 of each (once)."""
    from simsearch.storage.folder import create_database as _create_database
    from simsearch.storage.manifest import DATABASE_FILE, Manifest

    groups = max(50, n // 2_000)
    folder, done = work / "index", work / "stored.ok"
    if not done.exists():
        if (folder / DATABASE_FILE).exists():  # an interrupted setup: start again
            for file in folder.iterdir():
                file.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(
            model="synthetic", weights_sha256="0" * 64, architecture="none", layer=0,
            num_layers=0, pool="cls", dim=dim, index_type="flat",
        )  # fmt: skip
        _create_database(folder, manifest)
        start = time.perf_counter()
        _bulk_insert(folder / DATABASE_FILE, n, dim, groups)
        print(f"stored {n:,} vectors in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        done.touch()
    if not (work / "truth.npy").exists():
        q = clustered(0, queries, dim, groups, seed=2)
        best_s = np.full((queries, 10), -np.inf, dtype=np.float32)
        best_i = np.zeros((queries, 10), dtype=np.int64)
        for first in range(0, n, 10 * CHUNK):
            count = min(10 * CHUNK, n - first)
            s = q @ clustered(first, count, dim, groups, seed=1).T
            top = np.argpartition(-s, 10, axis=1)[:, :10]
            cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
            cand_i = np.concatenate([best_i, top + first + 1], axis=1)  # ids start at 1
            order = np.argsort(-cand_s, axis=1)[:, :10]
            best_s = np.take_along_axis(cand_s, order, 1)
            best_i = np.take_along_axis(cand_i, order, 1)
        np.save(work / "queries.npy", q)
        np.save(work / "truth.npy", best_i)


def _bulk_insert(database: Path, n: int, dim: int, groups: int) -> None:
    """Fill the index's tables directly: the setup, not what is measured (Store.write_batch
    commits a batch of images at a time, at ~3,000 rows/s; this is ~10x faster)."""
    import sqlite3

    db = sqlite3.connect(database)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    for first in range(0, n, 5 * CHUNK):
        count = min(5 * CHUNK, n - first)
        vectors = clustered(first, count, dim, groups, seed=1).astype("<f4")
        ids = range(first + 1, first + count + 1)
        db.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, sha256, width, height, status, "
            "indexed_at) VALUES (?, ?, 1, 1, ?, 1, 1, 'ok', 0)",
            ((i, f"/photos/{i // 1000:05d}/{i:08d}.jpg", f"{i:064x}") for i in ids),
        )
        db.executemany(
            "INSERT INTO vectors (image_id, vector) VALUES (?, ?)",
            zip(ids, (v.tobytes() for v in vectors), strict=True),
        )
        db.commit()
        if (first // (5 * CHUNK)) % 10 == 0:
            print(f"stored {first + count:,} of {n:,}", file=sys.stderr, flush=True)
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', '1')")
    db.commit()
    db.close()


def phase_build(work: Path, index_type: str) -> dict:
    from simsearch import Index

    with Index.open(work / "index") as index:
        start = time.perf_counter()
        index.set_index_type(index_type)
        seconds = time.perf_counter() - start
        info = index.info()
    size = (work / "index" / "vectors.faiss").stat().st_size
    return dict(
        build_s=round(seconds, 1),
        build_peak_rss_mb=round(peak_mb()),
        factory=info.index_factory,
        faiss_file_mb=round(size / 2**20),
    )


def phase_search(work: Path, rerank: int | None, single: int, nprobe, ef) -> dict:
    import simsearch.search.cache
    from simsearch import Index

    simsearch.search.cache.MMAP_MIN_BYTES = 1 << 62  # read the whole index: measure its RAM
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    base = rss_mb()
    with Index.open(work / "index") as index:
        start = time.perf_counter()
        index.vectors  # noqa: B018 (load)
        load_s = time.perf_counter() - start
        resident = rss_mb() - base
        params = dict(rerank=rerank, nprobe=nprobe, ef=ef)
        index.search_many(list(queries[:5]), k=10, **params)  # warm up
        times = []
        for q in queries[:single]:
            t = time.perf_counter()
            index.search_many([q], k=10, **params)
            times.append(time.perf_counter() - t)
        start = time.perf_counter()
        found = index.search_many(list(queries), k=10, **params)
        batch_s = time.perf_counter() - start
    pairs = zip(found, truth, strict=True)
    recall = np.mean([len({h.id for h in hits} & set(t.tolist())) / 10 for hits, t in pairs])
    ms = np.array(times) * 1000
    return dict(
        rerank=rerank,
        recall_at_10=round(float(recall), 4),
        p50_ms=round(float(np.percentile(ms, 50)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
        batch_qps=round(len(queries) / batch_s),
        load_s=round(load_s, 2),
        index_rss_mb=round(resident),
        process_rss_mb=round(rss_mb()),
    )


def phase_cold(work: Path) -> dict:
    """A fresh process's first answer, the index memory-mapped as `simsearch search` does."""
    from simsearch import Index

    start = time.perf_counter()
    q = np.load(work / "queries.npy")[0]
    with Index.open(work / "index") as index:
        index.search(q, k=10)
        mmapped = index.vectors.mmapped
    return dict(first_answer_s=round(time.perf_counter() - start, 2), mmapped=mmapped)


def run_phase(*argv) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *map(str, argv)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--single", type=int, default=300, help="single queries timed")
    parser.add_argument("--nprobe", default=None, help="IVF lists visited; a list: 16,32,64")
    parser.add_argument("--ef", default=None, help="HNSW candidate list; a list: 64,128,256")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--phase", choices=["build", "search", "cold"], help=argparse.SUPPRESS)
    parser.add_argument("--type", help=argparse.SUPPRESS)
    parser.add_argument("--rerank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(f"/tmp/simsearch-search-{args.n}x{args.dim}")

    if args.phase == "build":
        print(json.dumps(phase_build(work, args.type)))
        return
    if args.phase == "search":
        nprobe, ef = (None if v is None else int(v) for v in (args.nprobe, args.ef))
        print(json.dumps(phase_search(work, args.rerank, args.single, nprobe, ef)))
        return
    if args.phase == "cold":
        print(json.dumps(phase_cold(work)))
        return

    import faiss

    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.n, args.dim, args.queries)
    machine = dict(cpu=_cpu(), cores=os.cpu_count(), faiss=faiss.__version__)
    for index_type in args.types.split(","):
        row = dict(n=args.n, dim=args.dim, type=index_type, **machine)
        row.update(run_phase("--work", work, "--phase", "build", "--type", index_type))
        single = min(args.single, 100) if index_type == "flat" else args.single
        # The search setting this type has, swept over the values given (default: its own).
        flag = {"hnsw": "ef", "flat": None}.get(index_type, "nprobe")
        values = (getattr(args, flag) or "").split(",") if flag else [""]
        reranks = [None] if index_type in ("flat", "hnsw", "ivf") else [0, None]
        for value in values:
            extra = ["--single", single] + ([f"--{flag}", value] if value else [])
            for rerank in reranks:
                more = [] if rerank is None else ["--rerank", rerank]
                result = run_phase("--work", work, "--phase", "search", *extra, *more)
                setting = {flag: int(value)} if value else {}
                print(json.dumps({**row, **setting, **result}), flush=True)
        print(json.dumps({**row, **run_phase("--work", work, "--phase", "cold")}), flush=True)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
