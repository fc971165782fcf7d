"""How long `simsearch index` takes per image, end to end and in the model alone.

Makes a folder of real-size JPEGs from scikit-image's sample photographs (random crops,
resized to --size), then measures on the same images and threads:

  model-only   forward passes on tensors preprocessed beforehand (the ceiling)
  end-to-end   Index.add: listing, reading, hashing, decoding, preprocessing, model,
               SQLite commits and the FAISS write

    python benchmarks/index_speed.py --model ~/models/dinov2-small
    python benchmarks/index_speed.py --arch vit-l16      # random weights, real ViT-L/16 size

Prints a Markdown table row and a JSON line. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ARCHS = {
    # name: (hidden size, layers, heads, MLP size), patch 16 at 224 px as the real checkpoints
    "vit-b16": (768, 12, 12, 3072),
    "vit-l16": (1024, 24, 16, 4096),
}


def make_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Write `count` JPEGs of `size` made from random crops of skimage's colour photos."""
    import skimage.data
    from PIL import Image

    sources = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.hubble_deep_field(),
        skimage.data.immunohistochemistry(),
        skimage.data.retina(),
    ]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = Image.fromarray(sources[i % len(sources)])
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        img.save(folder / f"photo{i:05d}.jpg", quality=90)


def random_model(arch: str, folder: Path) -> Path:
    """Save a randomly initialised ViT of a real architecture size (speed needs no training)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    hidden, layers, heads, mlp = ARCHS[arch]
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=224,
        patch_size=16,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local model folder")
    source.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this size")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="1600x1200", help="WxH of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data", type=Path, default=None, help="keep the JPEGs here")
    args = parser.parse_args()

    import torch

    from simsearch import Index
    from simsearch.config import DEFAULT_WORKERS
    from simsearch.images import decode_image

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-"))
    try:
        size = tuple(int(v) for v in args.size.split("x"))
        photos = args.data or work / "photos"
        if not any(photos.glob("*.jpg")):
            make_photos(photos, args.images, size)
        files = sorted(photos.glob("*.jpg"))[: args.images]
        model = args.model or str(random_model(args.arch, work / args.arch))

        t0 = time.perf_counter()
        index = Index.create(work / "index", model=model, batch_size=args.batch_size)
        load_s = time.perf_counter() - t0
        embedder = index.embedder

        # Model only: the same images, preprocessed up front, through the same batches.
        pixels = np.stack([embedder.preprocess(decode_image(f.read_bytes())) for f in files])
        embedder.embed_pixels(pixels[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, len(pixels), args.batch_size):
            embedder.embed_pixels(pixels[start : start + args.batch_size])
        model_s = time.perf_counter() - t0

        workers = args.workers or DEFAULT_WORKERS
        t0 = time.perf_counter()
        summary = index.add(files, workers=workers)
        e2e_s = time.perf_counter() - t0
        index.close()
        assert summary.indexed == len(files), summary

        n = len(files)
        result = {
            "model": args.arch or Path(model).name,
            "images": n,
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "model_load_s": round(load_s, 2),
            "model_only_img_s": round(n / model_s, 2),
            "end_to_end_img_s": round(n / e2e_s, 2),
            "end_to_end_ms_per_img": round(1000 * e2e_s / n, 1),
            "ratio": round(model_s / e2e_s, 3),
        }
        print(
            f"| {result['model']} | {n} x {args.size} JPEG | {result['model_only_img_s']} | "
            f"{result['end_to_end_img_s']} | {result['end_to_end_ms_per_img']} | "
            f"{result['ratio']} |"
        )
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
