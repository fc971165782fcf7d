"""Index a folder and list its near-duplicate photos, with the Python API.

    python examples/find_duplicates.py ~/Pictures --model /path/to/model
    python examples/find_duplicates.py ~/Pictures --move-to ~/duplicates

Prints each group's photo to keep and the copies with their similarity, then how much disk
the copies take. The threshold is the index's calibrated one unless --threshold is given.
With --move-to, the copies are moved aside (undo with `simsearch dedup --undo MANIFEST`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from simsearch import Index, SimsearchError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of images to index and check")
    parser.add_argument(
        "--threshold", type=float, default=None, help="cosine similarity (default: calibrated)"
    )
    parser.add_argument("--move-to", help="move the copies under this folder (undoable)")
    parser.add_argument("--index", default="indexes/example", help="index folder")
    parser.add_argument(
        "--model",
        default=os.environ.get("SIMSEARCH_MODEL"),
        help="hub id or local model folder (default: $SIMSEARCH_MODEL)",
    )
    args = parser.parse_args()

    try:
        with Index.open_or_create(args.index, args.model) as index:
            summary = index.add(args.folder)
            print(
                f"{summary.indexed} indexed, {summary.unchanged} unchanged, {summary.failed} failed"
            )
            if args.threshold is None:
                found = index.dedup_calibration()
                print(
                    f"dedup threshold {found.threshold:.4f} (expected precision "
                    f"{found.precision:.3f}, recall {found.recall:.3f})"
                )
            groups = index.duplicates(args.threshold)
            report(groups)
            if args.move_to:
                moved = index.move_duplicates(groups, args.move_to)
                for path, reason in moved.skipped:
                    print(f"left alone: {path}: {reason}")
                print(f"moved {moved.files} files ({moved.bytes / 2**20:.1f} MB)")
                if moved.manifest:  # quoted, to paste into a shell
                    print(f"undo with: simsearch dedup --undo {shlex.quote(moved.manifest)}")
    except SimsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def report(groups) -> None:
    wasted = 0
    for group in groups:
        print(f"keep {group.keep_path}")
        for dup in group.duplicates:
            print(f"     {dup.score:.3f}  {dup.path}")
            if os.path.exists(dup.path):
                wasted += os.path.getsize(dup.path)
    copies = sum(len(g.duplicates) for g in groups)
    print(f"{len(groups)} groups, {copies} copies taking {wasted / 2**20:.1f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
