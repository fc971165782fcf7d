"""How long `simsearch index` takes per image, end to end and in the model alone.

Makes a folder of real-size JPEGs from scikit-image's sample photographs (random crops,
resized to --size), then measures on the same images and threads:

  model-only   forward passes on tensors preprocessed beforehand (the ceiling)
  end-to-end   Index.add: listing, reading, hashing, decoding, preprocessing, model,
               SQLite commits and the FAISS write
  baseline     (--baseline) the loop a user would write: AutoImageProcessor + AutoModel,
               one image at a time, fp32

for each precision asked for (--precision fp32,bf16,int8,auto).

    python benchmarks/index_speed.py --model ~/models/dinov2-small --baseline
    python benchmarks/index_speed.py --arch vit-l16      # random weights, real ViT-L/16 size

Prints Markdown table rows and JSON lines. Results are recorded in docs/benchmarks.md.
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


def baseline(model: str, files: list[Path]) -> float:
    """Images/s of the loop a user would write: AutoImageProcessor + AutoModel, batch 1, fp32."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model)
    net = AutoModel.from_pretrained(model).eval()
    with torch.inference_mode():
        net(**processor(images=Image.open(files[0]).convert("RGB"), return_tensors="pt"))
        start = time.perf_counter()
        for f in files:
            inputs = processor(images=Image.open(f).convert("RGB"), return_tensors="pt")
            net(**inputs).last_hidden_state[:, 0]
    return len(files) / (time.perf_counter() - start)


def measure(
    model: str, files: list[Path], work: Path, precision: str, batch_size: int, workers: int
) -> dict:
    """Model-only and end-to-end images/s for one precision."""
    from simsearch import Index
    from simsearch.media.decode import decode_image

    index_dir = work / f"index-{precision}"
    t0 = time.perf_counter()
    index = Index.create(index_dir, model=model, batch_size=batch_size, precision=precision)
    load_s = time.perf_counter() - t0
    embedder = index.embedder
    # Model only: the same images, decoded and preprocessed up front, in the same batches.
    pre = embedder.preprocess
    pixels = np.stack([pre(decode_image(f.read_bytes(), draft=pre)) for f in files])
    embedder.embed_pixels(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        embedder.embed_pixels(pixels[start : start + batch_size])
    model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = index.add(files, workers=workers)
    e2e_s = time.perf_counter() - t0
    index.close()
    assert summary.indexed == len(files), summary
    n = len(files)
    return {
        "precision": embedder.precision,
        "model_load_s": round(load_s, 2),
        "model_only_img_s": round(n / model_s, 2),
        "end_to_end_img_s": round(n / e2e_s, 2),
        "end_to_end_ms_per_img": round(1000 * e2e_s / n, 1),
        "ratio": round(model_s / e2e_s, 3),
        "stages": {k: round(v, 2) for k, v in summary.stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local model folder")
    source.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this size")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="1600x1200", help="WxH of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--precision", default="fp32,auto", help="comma-separated precisions to measure"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time the batch-1 fp32 AutoImageProcessor + AutoModel loop",
    )
    parser.add_argument("--data", type=Path, default=None, help="keep the JPEGs here")
    args = parser.parse_args()

    import torch

    from simsearch.config import DEFAULT_WORKERS

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-"))
    try:
        size = tuple(int(v) for v in args.size.split("x"))
        photos = args.data or work / "photos"
        if len(list(photos.glob("*.jpg"))) < args.images:
            make_photos(photos, args.images, size)
        files = sorted(photos.glob("*.jpg"))[: args.images]
        model = args.model or str(random_model(args.arch, work / args.arch))
        workers = args.workers or DEFAULT_WORKERS
        name = args.arch or Path(model).name
        about = {
            "model": name,
            "images": len(files),
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
        }
        print(json.dumps(about))
        base = baseline(model, files) if args.baseline else None
        if base is not None:
            print(json.dumps({"baseline_img_s": round(base, 2)}))
        print(
            "| model | precision | model only (img/s) | end to end (img/s) | ms/img | "
            "end to end / model only | vs baseline |"
        )
        for precision in args.precision.split(","):
            r = measure(model, files, work, precision, args.batch_size, workers)
            versus = f"{r['end_to_end_img_s'] / base:.2f}x" if base else "-"
            label = precision if precision == r["precision"] else f"{precision} ({r['precision']})"
            print(
                f"| {name} | {label} | {r['model_only_img_s']} | {r['end_to_end_img_s']} | "
                f"{r['end_to_end_ms_per_img']} | {r['ratio']} | {versus} |",
                flush=True,
            )
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
