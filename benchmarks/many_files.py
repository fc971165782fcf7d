"""How simsearch copes with many files: a first run, a re-run with nothing changed, a search.

Makes N small PNGs (random noise, 16x16, in folders of 1,000) and a tiny random ViT, so that
the model costs little and the per-file overheads show: listing, stat, hashing, decoding,
SQLite commits, the FAISS file, and the unchanged-file check of a re-run.

    python benchmarks/many_files.py --files 20000

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    work = args.keep or Path(tempfile.mkdtemp(prefix="simsearch-many-"))
    try:
        photos, model = work / "photos", work / "tiny-vit"
        rng = np.random.default_rng(0)
        for i in range(args.files):
            folder = photos / f"d{i // 1000:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:07d}.png")
        torch.manual_seed(0)
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(model)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model)

        def simsearch(*argv) -> tuple[float, str]:
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "simsearch", "-q", *argv],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            return time.perf_counter() - start, out

        index = work / "index"
        first_s, first = simsearch(
            "index",
            str(photos),
            "--index",
            str(index),
            "--model",
            str(model),
            "--precision",
            "fp32",
            "--json",
        )
        again_s, again = simsearch("index", str(photos), "--index", str(index), "--json")
        search_s, _ = simsearch("search", "id:5", "--index", str(index), "-k", "10")
        first, again = json.loads(first), json.loads(again)
        result = {
            "files": args.files,
            "first_run_s": round(first_s, 1),
            "first_run_stages": {k: round(v, 1) for k, v in first["stages"].items()},
            "rerun_s": round(again_s, 1),
            "rerun_in_process_s": round(again["seconds"], 2),
            "rerun_unchanged": again["unchanged"],
            "search_command_s": round(search_s, 2),
            "index_bytes": sum(f.stat().st_size for f in index.iterdir()),
        }
        print(json.dumps(result))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
