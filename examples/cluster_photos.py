"""Index a folder, group its photos into clusters of similar ones, with the Python API.

    python examples/cluster_photos.py ~/Pictures -k auto --model /path/to/model
    python examples/cluster_photos.py ~/Pictures -k 12 --link-into clusters/

Prints each cluster's size and the photos nearest its centre. With --link-into DIR, also
makes DIR/cluster-01/, DIR/cluster-02/, ... holding a symbolic link to each photo of that
cluster (the photos themselves are not moved or copied), to browse them in a file manager.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from simsearch import Index, SimsearchError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of images to index and cluster")
    parser.add_argument("-k", default="auto", help="number of clusters, or auto (default)")
    parser.add_argument("--top", type=int, default=3, help="photos shown per cluster")
    parser.add_argument("--link-into", type=Path, help="new folder of one folder per cluster")
    parser.add_argument("--index", default="indexes/example", help="index folder")
    parser.add_argument(
        "--model",
        default=os.environ.get("SIMSEARCH_MODEL"),
        help="hub id or local model folder (default: $SIMSEARCH_MODEL)",
    )
    args = parser.parse_args()
    if args.link_into is not None and args.link_into.exists():
        print(f"error: {args.link_into} exists; name a new folder", file=sys.stderr)
        return 1

    try:
        with Index.open_or_create(args.index, args.model) as index:
            summary = index.add(args.folder)
            print(
                f"{summary.indexed} indexed, {summary.unchanged} unchanged, {summary.failed} failed"
            )
            run = index.cluster(args.k)
            clusters = index.clusters(top=args.top)
            members = (
                {c.id: index.cluster_members(c.id) for c in clusters}
                if args.link_into is not None
                else {}
            )
    except SimsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for cluster in clusters:
        print(f"cluster {cluster.id}: {cluster.size} photos")
        for hit in cluster.central:
            print(f"  {hit.score:.3f}  {hit.path}")
    print(
        f"{run.clusters} clusters of {run.images} images (k={run.k}, "
        f"silhouette {run.silhouette:.3f}, {run.seconds:.1f} s)"
    )
    width = len(str(len(clusters)))
    for cluster_id, hits in members.items():
        folder = args.link_into / f"cluster-{cluster_id:0{width}d}"
        folder.mkdir(parents=True)
        for hit in hits:
            # Prefix with the id: two photos may share a file name in different folders.
            (folder / f"{hit.id}-{Path(hit.path).name}").symlink_to(hit.path)
    if args.link_into is not None:
        print(f"linked each cluster's photos under {args.link_into}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
