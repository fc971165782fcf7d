"""Index a folder of photos and print the nearest neighbours of a query, with the Python API.

    python examples/search_photos.py examples/photos examples/queries/cat-flipped-crop.jpg \
        --model /path/to/model-folder

Run it twice: the second run skips every unchanged photo and only answers the query.
"""

from __future__ import annotations

import argparse
import os
import sys

from simsearch import Index, SimsearchError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of images to index")
    parser.add_argument("query", help="image to search for")
    parser.add_argument("--index", default="indexes/example", help="index folder")
    parser.add_argument(
        "--model",
        default=os.environ.get("SIMSEARCH_MODEL"),
        help="hub id or local model folder (default: $SIMSEARCH_MODEL)",
    )
    parser.add_argument("-k", type=int, default=5, help="neighbours to show")
    args = parser.parse_args()

    try:
        with Index.open_or_create(args.index, args.model) as index:
            summary = index.add(args.folder)
            print(
                f"{summary.indexed} indexed, {summary.unchanged} unchanged, {summary.failed} failed"
            )
            for rank, hit in enumerate(index.search(args.query, k=args.k), 1):
                print(f"{rank:>2}. {hit.score:.3f}  {hit.path}")
    except SimsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
