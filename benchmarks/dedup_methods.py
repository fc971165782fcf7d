"""Replay dedup threshold methods on dedup_quality's cached collections, offline.

`dedup_quality.py --cache DIR` keeps each indexed collection (its vectors, its true copy
pairs and the calibration's inputs). This script reads them and, for each collection, finds
the window of thresholds that meet dedup_quality's target (F1 within 0.05 of the best fixed
threshold's, precision at least 0.85), then asks each method for its threshold and counts
the collections whose threshold falls in the window. It runs in about a minute, so a new
method can be judged on every draw before the 8-minute benchmark is run again.

    python benchmarks/dedup_quality.py --model ~/models/dinov2-small --cache /tmp/calib-cache \\
        --seeds 0,1,2,3,4,5,6,7
    python benchmarks/dedup_methods.py --cache /tmp/calib-cache

Methods:

- shipped: `simsearch.ops.calibrate.decide` (method 3).
- mixture: the neighbours' scores taken as a mixture of copies, scoring as the edited
  copies (and their siblings) do, and others; the copies' count from the neighbours above
  the edited copies' 30th percentile; F1 of the kernel-smoothed expected counts, best cut.
- mixture-groups: as mixture, but each neighbour counts by its posterior chance of being a
  copy, and only the neighbours a star group around the image would hold (direct score at
  the cut) count as found: the pairwise metric's view, one image at a time.

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import dedup_quality  # benchmarks/ is on the path when this script runs
import numpy as np

STEP = 0.0005
SWEEP = np.round(np.arange(0.85, 0.99, STEP), 4)
CUTS = np.arange(0.85, 0.995, STEP)


def window(snap) -> tuple[float, float] | None:
    """The lowest and highest swept thresholds that meet the target, or None."""
    rows = [(float(t), *dedup_quality.score(snap.found(float(t)), snap.truth)) for t in SWEEP]
    best = max(r[3] for r in rows)
    ok = [r[0] for r in rows if r[3] >= best - 0.05 and r[1] >= 0.85]
    return (min(ok), max(ok)) if ok else None


def _scores(inputs):
    ids = inputs.originals
    copies = np.concatenate([inputs.copies[i] for i in ids] + [inputs.siblings[i] for i in ids])
    neighbours = np.concatenate([inputs.neighbours[i] for i in ids])
    return copies, neighbours


def _copies_among(copies, neighbours, q=0.3) -> float:
    return max(float((neighbours >= np.quantile(copies, q)).sum()) / (1 - q), 1.0)


def mixture(inputs, bw: float = 0.005) -> float:
    from scipy.special import ndtr

    copies, neighbours = _scores(inputs)
    expected = _copies_among(copies, neighbours)
    share = ndtr((copies[None, :] - CUTS[:, None]) / bw).mean(1)
    held = ndtr((neighbours[None, :] - CUTS[:, None]) / bw).sum(1)
    tp = expected * share
    fp = np.maximum(held - tp, 0)
    f = 2 * tp / (2 * tp + (expected - tp) + fp)
    return float(CUTS[np.argmax(f)])


def mixture_groups(inputs, bw: float = 0.01) -> float:
    copies, neighbours = _scores(inputs)
    expected = _copies_among(copies, neighbours)

    def density(x, points):
        return np.exp(-0.5 * ((x[:, None] - points[None, :]) / bw) ** 2).sum(1)

    tp, fp, fn = np.zeros(len(CUTS)), np.zeros(len(CUTS)), np.zeros(len(CUTS))
    for i in inputs.originals:
        s = inputs.neighbours[i]
        if not len(s):
            continue
        f_copy = density(s, copies) / len(copies) * expected
        p = np.clip(f_copy / np.maximum(density(s, neighbours), 1e-12), 0, 1)
        member = s[None, :] >= CUTS[:, None]
        tp += (member * p).sum(1)
        fp += (member * (1 - p)).sum(1)
        fn += (~member * p).sum(1)
    f = 2 * tp / (2 * tp + fn + fp)
    return float(CUTS[np.argmax(f)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="dedup_quality's --cache")
    args = parser.parse_args()
    from simsearch.ops.calibrate import decide

    # The cache holds dedup_quality.Snapshot objects, pickled by that script's __main__.
    sys.modules["__main__"].Snapshot = dedup_quality.Snapshot
    methods = {
        "shipped": lambda inputs: decide(inputs).threshold,
        "mixture": mixture,
        "mixture-groups": mixture_groups,
    }
    met = {name: {} for name in methods}
    print("| collection | window that meets the target |", " | ".join(methods), "|")
    print("|---|---|" + "---|" * len(methods))
    for path in sorted(args.cache.glob("*.pickle")):
        snap = pickle.loads(path.read_bytes())  # a cache dedup_quality wrote
        kind = path.stem.rsplit("-", 2)[0]
        w = window(snap)
        cells = []
        for name, method in methods.items():
            t = method(snap.inputs)
            ok = w is not None and w[0] <= t < w[1] + STEP
            met[name].setdefault(kind, []).append(ok)
            cells.append(f"{t:.4f}{' met' if ok else ''}")
        span = f"{w[0]:.4f}-{w[1]:.4f}" if w else "none"
        print(f"| {path.stem} | {span} |", " | ".join(cells), "|")
    print()
    for name, kinds in met.items():
        counts = ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in kinds.items())
        total = sum(sum(v) for v in kinds.values())
        print(f"{name}: {total}/{sum(len(v) for v in kinds.values())} ({counts})")


if __name__ == "__main__":
    main()
