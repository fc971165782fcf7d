"""Search while an index run is writing: what one search costs a reader, on an HNSW index.

Makes (once) an index folder of N synthetic clustered unit vectors (benchmarks/
search_scale.py's data), builds and saves its HNSW graph, then starts a writer process that
takes the write lock, commits `--added` more images (their vectors in the database, the
FAISS file not yet saved again: an index run between two of its saves) and waits. In this
process, each search opens the index afresh (as every `simsearch search` does) and asks for
the 10 nearest of a stored vector; it is timed, and so is what each such search cost before
(a rebuild of the graph from the database).

    python benchmarks/search_while_indexing.py --n 200000 --dim 384

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from search_scale import clustered, prepare, rss_mb

WRITER = """
import sys, time
import numpy as np
sys.path.insert(0, {bench!r})
from search_scale import clustered
from simsearch import Index
from simsearch.storage.store import GoodImage
index = Index.open({folder!r})
index.parts.folder.lock.acquire()
n, added, dim = {n}, {added}, {dim}
vectors = clustered(n, added, dim, max(50, n // 2000), seed=7)
good = [GoodImage(f"/added/{{i}}.jpg", 1, 1, f"{{10**9 + i:064x}}", 8, 8) for i in range(added)]
index.store.write_batch(good, vectors, [], [])
print("committed", flush=True)
time.sleep(600)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--added", type=int, default=1_000, help="images committed meanwhile")
    parser.add_argument("--searches", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    from simsearch import Index

    work = args.work or Path(f"/tmp/simsearch-while-indexing-{args.n}x{args.dim}")
    prepare(work, args.n, args.dim, queries=10)
    folder = work / "index"
    with Index.open(folder) as index:
        if index.info().index_built != "hnsw" or index.verify():
            started = time.perf_counter()
            index.set_index_type("hnsw")
            print(f"built HNSW in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    bench = str(Path(__file__).resolve().parent)
    code = WRITER.format(bench=bench, folder=str(folder), n=args.n, added=args.added, dim=args.dim)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "committed"
        # One of the images the writer committed since its save: it must come first.
        query = clustered(args.n, args.added, args.dim, max(50, args.n // 2000), seed=7)[-1]
        times, found = [], None
        for _ in range(args.searches):
            started = time.perf_counter()
            with Index.open(folder) as index:
                found = index.search(query, k=10)
            times.append(time.perf_counter() - started)
        rebuild_started = time.perf_counter()
        with Index.open(folder) as index:
            index.parts.cache.rebuild()  # what every search paid before
        rebuild = time.perf_counter() - rebuild_started
    finally:
        writer.kill()
        writer.wait()
    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "added_since_save": args.added,
                "search_seconds_median": round(float(np.median(times)), 3),
                "search_seconds_max": round(max(times), 3),
                "first_hit_is_an_added_image": found[0].path.startswith("/added/"),
                "rebuild_seconds_before": round(rebuild, 1),
                "rss_mb": round(rss_mb()),
            }
        )
    )


if __name__ == "__main__":
    main()
