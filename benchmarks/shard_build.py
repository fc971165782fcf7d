"""Sharded on-disk IVF-PQ: build time by stage, peak memory of the builder and of a
searcher, recall@10 after re-ranking and latency, on N synthetic 768-d vectors.

    python benchmarks/shard_build.py --n 1000000
    nice -n 10 python benchmarks/shard_build.py --n 10000000 --work /data/shards-10m

Phases, each in its own process so that each one's peak RSS (VmHWM) is its own:

1. data: parquet shards of `--shard-rows` rows (the export's columns: id, path, path_bytes,
   vector; the vectors as float16 to halve the disk), generated one shard at a time from
   a seed per shard, so the generator never holds more than one chunk; then the queries
   (other draws of the same mixture) and their exact top 10, by scanning the shards in
   chunks. Kept in the work folder and reused.
2. build: `simsearch.ops.shards.build` (what `simsearch shards build` runs), timed by stage.
3. search: a fresh process opens the index (lists and vectors memory-mapped) and answers
   the queries one at a time at each --nprobe, with and without re-ranking.

The data: a mixture of N / 2,000 groups, each a Gaussian spread along 8 directions of its
own plus a little isotropic noise, normalised (the same family as search_scale.py).
Results are JSON lines on stdout; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 50_000  # vectors generated (and scanned for the exact answers) at a time
FIXED_SEED = 12345  # the mixture itself: the same for every shard and the queries


def mixture(dim: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    fixed = np.random.default_rng(FIXED_SEED)
    centres = (fixed.standard_normal((groups, dim)) / np.sqrt(dim)).astype(np.float32)
    bases = (fixed.standard_normal((groups, 8, dim)) / np.sqrt(dim)).astype(np.float32)
    return centres, bases


def draw(n: int, seed: list[int], centres: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """`n` unit vectors of the mixture, from `seed` alone."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    group = rng.integers(0, len(centres), n)
    z = (0.7 * rng.standard_normal((n, 8))).astype(np.float32)
    x = centres[group] + np.einsum("nr,nrd->nd", z, bases[group])
    x += (0.15 / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def peak() -> dict:
    """This process's memory, MB: peak resident (VmHWM) and resident now, anonymous and
    file-backed (mapped pages of the index files count as file-backed)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def phase_data(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    work, dim = Path(args.work), args.dim
    folder = work / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    centres, bases = mixture(dim, max(50, args.n // 2_000))
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("path_bytes", pa.binary()),
            ("vector", pa.list_(pa.float16(), dim)),
        ]
    )
    started = time.perf_counter()
    shards = (args.n + args.shard_rows - 1) // args.shard_rows
    for s in range(shards):
        final = folder / f"part-{s:05d}.parquet"
        if final.exists():
            continue
        tmp = folder / f".part-{s:05d}.parquet.tmp"
        first, rows = s * args.shard_rows, min(args.shard_rows, args.n - s * args.shard_rows)
        with pq.ParquetWriter(tmp, schema) as writer:
            for offset in range(0, rows, CHUNK):
                count = min(CHUNK, rows - offset)
                vectors = draw(count, [1, s, offset // CHUNK], centres, bases)
                ids = np.arange(first + offset + 1, first + offset + count + 1, dtype=np.int64)
                paths = [f"/photos/{i // 1000:05d}/{i:08d}.jpg" for i in ids]
                flat = pa.array(vectors.astype(np.float16).reshape(-1))
                table = pa.table(
                    [
                        pa.array(ids),
                        pa.array(paths),
                        pa.array([p.encode() for p in paths], pa.binary()),
                        pa.FixedSizeListArray.from_arrays(flat, dim),
                    ],
                    schema=schema,
                )
                writer.write_table(table)
        os.rename(tmp, final)
        print(f"wrote shard {s + 1} of {shards}", file=sys.stderr, flush=True)
    written = time.perf_counter() - started
    truth_file = work / f"truth-{args.queries}.npy"
    started = time.perf_counter()
    if not truth_file.exists():
        queries = draw(args.queries, [2], centres, bases)
        best_s = np.full((args.queries, 10), -np.inf, dtype=np.float32)
        best_i = np.zeros((args.queries, 10), dtype=np.int64)
        for part in sorted(folder.glob("part-*.parquet")):
            for batch in pq.ParquetFile(part).iter_batches(CHUNK, columns=["id", "vector"]):
                ids = batch.column(0).to_numpy()
                x = batch.column(1).flatten().to_numpy().astype(np.float32).reshape(-1, dim)
                s = queries @ x.T
                top = np.argpartition(-s, 10, axis=1)[:, :10]
                cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
                cand_i = np.concatenate([best_i, ids[top]], axis=1)
                order = np.argsort(-cand_s, axis=1)[:, :10]
                best_s = np.take_along_axis(cand_s, order, 1)
                best_i = np.take_along_axis(cand_i, order, 1)
        np.save(work / f"queries-{args.queries}.npy", queries)
        np.save(truth_file, best_i)
    parquet = sum(p.stat().st_size for p in folder.glob("part-*.parquet"))
    return {
        "phase": "data",
        "n": args.n,
        "shards": shards,
        "write_s": round(written, 1),
        "truth_s": round(time.perf_counter() - started, 1),
        "parquet_mb": round(parquet / 2**20),
        "peak_mb": peak(),
    }


def phase_build(args) -> dict:
    from dataclasses import asdict

    from simsearch.ops.shards import build

    work = Path(args.work)
    out = work / "index"
    if out.exists():
        shutil.rmtree(out)  # the benchmark's own output folder, rebuilt each run
    started = time.perf_counter()
    report = build(
        work / "shards", out, nlist=args.nlist, m=args.m, ray="local" if args.ray else None
    )
    return {
        "phase": "build",
        "total_s": round(time.perf_counter() - started, 1),
        **asdict(report),
        "peak_mb": peak(),
    }


def phase_search(args) -> dict:
    from simsearch.search.ondisk import OnDiskIndex

    work = Path(args.work)
    queries = np.load(work / f"queries-{args.queries}.npy")
    truth = np.load(work / f"truth-{args.queries}.npy")
    started = time.perf_counter()
    index = OnDiskIndex.open(work / "index")
    index.search(queries[:1], 10)
    opened = {"open_and_first_s": round(time.perf_counter() - started, 3), "mb": peak()}
    rows = []
    for nprobe in [int(p) for p in args.nprobe.split(",")]:
        for rerank in (0, *(int(r) for r in args.rerank.split(","))):
            times, found = [], []
            for q in queries:
                t = time.perf_counter()
                result = index.search(q[None], 10, nprobe=nprobe, rerank=rerank)[0]
                times.append(time.perf_counter() - t)
                found.append({h.id for h in result.hits})
            recall = np.mean([len(f & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
            ms = np.array(times) * 1000
            rows.append(
                {
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "recall@10": round(float(recall), 3),
                    "p50_ms": round(float(np.percentile(ms, 50)), 2),
                    "p99_ms": round(float(np.percentile(ms, 99)), 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"phase": "search", "opened": opened, "rows": rows, "peak_mb": peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard-rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--nprobe", default="16,32,64")
    parser.add_argument("--rerank", default="10", help="re-rank factors, besides 0 (none)")
    parser.add_argument("--ray", action="store_true", help="fill the shards in Ray tasks")
    parser.add_argument("--work", default=None, help="default: /tmp/simsearch-shards-N")
    parser.add_argument("--phase", choices=("data", "build", "search"), default=None)
    args = parser.parse_args()
    args.work = args.work or f"/tmp/simsearch-shards-{args.n}"
    if args.phase:
        result = {"data": phase_data, "build": phase_build, "search": phase_search}[args.phase]
        print(json.dumps(result(args)), flush=True)
        return
    for phase in ("data", "build", "search"):
        command = [sys.executable, __file__, *sys.argv[1:], "--phase", phase]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
