"""Index a folder and list its near-duplicate photos, with the Python API.

    python examples/find_duplicates.py ~/Pictures --threshold 0.95 --model /path/to/model

Prints each group's photo to keep and the copies with their similarity, then how much disk
the copies take. It only reports: deciding what to delete is yours.
"""

from __future__ import annotations

import argparse
import os

from simsearch import Index, SimsearchError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of images to index and check")
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine similarity")
    parser.add_argument("--index", default="indexes/example", help="index folder")
    parser.add_argument(
        "--model",
        default=os.environ.get("SIMSEARCH_MODEL"),
        help="hub id or local model folder (default: $SIMSEARCH_MODEL)",
    )
    args = parser.parse_args()

    try:
        with Index.open_or_create(args.index, args.model) as index:
            print(index.add(args.folder).line())
            groups = index.duplicates(args.threshold)
    except SimsearchError as exc:
        print(f"error: {exc}")
        return 1
    wasted = 0
    for group in groups:
        print(f"keep {group.keep_path}")
        for dup in group.duplicates:
            print(f"     {dup.score:.3f}  {dup.path}")
            if os.path.exists(dup.path):
                wasted += os.path.getsize(dup.path)
    copies = sum(len(g.duplicates) for g in groups)
    print(f"{len(groups)} groups, {copies} copies taking {wasted / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
