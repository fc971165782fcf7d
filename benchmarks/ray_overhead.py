"""What `index --ray` costs against a local run on the same machine, the same images and
the same model: the price of the Ray Data pipeline (object store, tasks, actor) per image,
and its start-up (connecting, the actor loading the model).

Makes a folder of camera-size JPEGs from scikit-image's photographs (index_speed's), then
indexes half of it and all of it into fresh indexes, alternating local and Ray runs
(--repeat each), and reports the median of each, and from the two sizes the cost per image
and the cost per run (start-up: the actor loading the model, the pipeline starting):

  local   Index.add: reader threads and the model in this process
  ray     Index.add(ray=...): a Ray cluster of this machine alone (started once, before
          the runs; its start is reported apart), read tasks and one embedding actor

    python benchmarks/ray_overhead.py --model ~/models/dinov2-small --count 240

Prints a Markdown table and JSON lines; results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from index_speed import make_photos


def _run(model: str, photos: Path, folder: Path, precision: str, ray_settings=None) -> dict:
    from simsearch import Index

    shutil.rmtree(folder, ignore_errors=True)
    with Index.create(folder, model=model, precision=precision) as idx:
        start = time.perf_counter()
        summary = idx.add(photos, ray=ray_settings)
        seconds = time.perf_counter() - start
    assert summary.failed == 0 and summary.indexed > 0, summary
    return {"seconds": seconds, "images": summary.indexed, "stages": summary.stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (real weights)")
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--size", default="1600x1200", help="JPEG size, WxH")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--actor-cpus", type=float, default=2, help="CPUs the embedding actor reserves"
    )
    args = parser.parse_args()

    import ray

    from simsearch import RaySettings

    w, h = (int(x) for x in args.size.split("x"))
    cores = os.cpu_count() or 1
    half = args.count // 2
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.count, (w, h))
        # The first half in a folder of its own: a run of N/2 and one of N tell the cost
        # per run (start-up, the actor loading the model) from the cost per image.
        first = Path(tmp) / "half"
        first.mkdir()
        for f in sorted(photos.iterdir())[:half]:
            os.link(f, first / f.name)
        start = time.perf_counter()
        # One more logical CPU than the actor takes: its model gets the threads a local run
        # gets, and the read tasks still get one (as a local run's reader threads share the
        # cores).
        ray.init(num_cpus=int(args.actor_cpus) + 1, include_dashboard=False)
        started = time.perf_counter() - start
        settings = RaySettings(workers=1, cpus_per_worker=args.actor_cpus)
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeat):
            for folder, n in ((first, half), (photos, args.count)):
                for path, ray_settings in (("local", None), ("ray", settings)):
                    out = _run(args.model, folder, Path(tmp) / path, args.precision, ray_settings)
                    runs.setdefault((path, n), []).append(out)
        ray.shutdown()

    median = {key: statistics.median(r["seconds"] for r in v) for key, v in runs.items()}
    print(f"cores: {cores}, {args.size} JPEGs, {args.precision}, median of {args.repeat}")
    print("| path | s for N/2 | s for N | img/s at N | ms per image | s per run (fixed) |")
    print("|---|---|---|---|---|---|")
    marginal = {}
    for path in ("local", "ray"):
        t_half, t_full = median[(path, half)], median[(path, args.count)]
        marginal[path] = (t_full - t_half) / (args.count - half)
        fixed = t_full - marginal[path] * args.count
        print(
            f"| {path} | {t_half:.2f} | {t_full:.2f} | {args.count / t_full:.2f} | "
            f"{marginal[path] * 1000:.1f} | {fixed:.2f} |"
        )
    print(
        f"Ray overhead per image: {(marginal['ray'] - marginal['local']) * 1000:+.1f} ms; "
        f"cluster start {started:.1f} s (once, not in the runs)"
    )
    for (path, n), v in runs.items():
        for r in v:
            print(json.dumps({"path": path, "count": n, **r}))


if __name__ == "__main__":
    main()
