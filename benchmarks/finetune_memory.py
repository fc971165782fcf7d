"""Peak memory of `simsearch finetune`, with and without --gradient-checkpointing.

Takes --model, or builds a randomly initialised ViT of a real size (--arch vit-b16 or
vit-l16: memory does not depend on the weight values), makes two classes of photos (crops
of scikit-image's sample photographs, one set of sources per class), and runs
`simsearch finetune` for one short epoch per setting, each in a fresh process:

  default             the head and the last 2 blocks train
  default + GC        the same with --gradient-checkpointing
  full                --freeze-layers 0: every block trains
  full + GC           the same with --gradient-checkpointing

Each run's peak comes from its --json summary: the process's peak RSS on the CPU, CUDA's
peak allocation on a GPU. "model loaded" is a process that only loads the model for
training, the floor under every figure.

    python benchmarks/finetune_memory.py --arch vit-b16 --batch-size 8
    python benchmarks/finetune_memory.py --model ~/models/dinov2-small --batch-size 8

Prints a Markdown table and JSON lines. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from index_speed import ARCHS, random_model  # the same model sizes, built the same way

SETTINGS = {
    "default": [],
    "default + GC": ["--gradient-checkpointing"],
    "full": ["--freeze-layers", "0"],
    "full + GC": ["--freeze-layers", "0", "--gradient-checkpointing"],
}

LOAD_ONLY = """
import resource, sys
from pathlib import Path
from simsearch.train.transfer import freeze, load_for_training
model = load_for_training(Path(sys.argv[1]), sys.argv[1], ["a", "b"])
freeze(model, None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_classes(folder: Path, per_class: int, size: tuple[int, int] = (320, 256)) -> Path:
    """Write two class folders of JPEG crops, each class cropped from its own photographs."""
    import skimage.data
    from PIL import Image

    sources = {
        "people-and-cats": [skimage.data.astronaut(), skimage.data.chelsea()],
        "things": [skimage.data.coffee(), skimage.data.rocket()],
    }
    rng = np.random.default_rng(0)
    for name, photos in sources.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            src = Image.fromarray(photos[i % len(photos)])
            w, h = src.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
            crop.save(folder / name / f"{i:04d}.jpg", quality=90)
    return folder


def run(model: str, data: Path, output: Path, extra: list[str], args) -> dict:
    command = [
        sys.executable, "-m", "simsearch", "-q", "finetune", str(data),
        "--output", str(output), "--model", model, "--epochs", "1",
        "--batch-size", str(args.batch_size), "--precision", args.precision,
        "--device", args.device, "--json", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    summary = json.loads(done.stdout)
    return {
        "peak_bytes": summary["peak_memory_bytes"],
        "kind": summary["peak_memory_kind"],
        "steps": summary["steps"],
        "val_accuracy": summary["best_accuracy"],
        "seconds": round(time.perf_counter() - start, 1),
        "command": " ".join(command[2:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: a random --arch model)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit-b16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=20, help="images per class")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="finetune-memory-") as tmp:
        work = Path(tmp)
        model = args.model or str(random_model(args.arch, work / args.arch))
        data = make_classes(work / "data", args.per_class)
        load = subprocess.run(
            [sys.executable, "-c", LOAD_ONLY, model], capture_output=True, text=True, check=True
        )
        floor = int(load.stdout.split()[-1])
        print(f"model: {args.model or args.arch}, batch {args.batch_size}, {args.precision}")
        print("| setting | peak memory | steps | val accuracy | seconds |")
        print("|---|---|---|---|---|")
        print(f"| model loaded (no training) | {floor / 2**30:.2f} GiB | | | |")
        rows = []
        for name in args.settings.split(","):
            result = run(model, data, work / name.replace(" ", ""), SETTINGS[name], args)
            rows.append({"setting": name, **result})
            print(
                f"| {name} | {result['peak_bytes'] / 2**30:.2f} GiB ({result['kind']}) | "
                f"{result['steps']} | {result['val_accuracy']:.3f} | {result['seconds']} |",
                flush=True,
            )
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
