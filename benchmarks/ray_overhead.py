"""What `index --ray` costs against a local run on the same machine, the same images and
the same model: the price of the Ray Data pipeline (object store, tasks, actor) per image,
and its start-up (connecting, the actor loading the model).

Makes a folder of camera-size JPEGs from scikit-image's photographs (index_speed's), then
indexes it into fresh indexes, alternating local and Ray runs (--repeat each), and reports
the median of each:

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
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.count, (w, h))
        start = time.perf_counter()
        # One more logical CPU than the machine has: the actor takes the model's threads and
        # the read tasks still get one (as a local run's reader threads share the cores).
        ray.init(num_cpus=int(args.actor_cpus) + 1, include_dashboard=False)
        started = time.perf_counter() - start
        settings = RaySettings(workers=1, cpus_per_worker=args.actor_cpus)
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for _ in range(args.repeat):
            runs["local"].append(_run(args.model, photos, Path(tmp) / "a", args.precision))
            runs["ray"].append(
                _run(args.model, photos, Path(tmp) / "b", args.precision, settings)
            )
        ray.shutdown()

    median = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    n = runs["local"][0]["images"]
    per_image_ms = (median["ray"] - median["local"]) / n * 1000
    print(
        f"| path | images | median s | img/s | (cores: {cores}, {args.size} JPEGs, "
        f"{args.precision}) |"
    )
    print("|---|---|---|---|---|")
    for k in ("local", "ray"):
        print(f"| {k} | {n} | {median[k]:.2f} | {n / median[k]:.2f} | |")
    print(f"Ray overhead: {per_image_ms:+.1f} ms per image; cluster start {started:.1f} s")
    for k, v in runs.items():
        for r in v:
            print(json.dumps({"path": k, **r}))


if __name__ == "__main__":
    main()
