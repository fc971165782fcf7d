"""How well does a student stand in for its teacher? recall@10 of student-embedded held-out
queries against the teacher's neighbours, and speed, by student size and training time.

The teacher is the real DINOv2-S/14; the images are made from scikit-image's 18 sample
photographs (no download): random resized crops (15-100 % of the area), flips, rotations,
colour, brightness and contrast jitter, blur and grey, so that `--images` of them look like
a collection of real photographs with near and far neighbours. The script indexes them with
the teacher once, then runs `simsearch distill` for each student size and epoch count, and
prints one JSON line per student (also written to --out):

    python benchmarks/distill_quality.py --model ~/models/dinov2-small --images 3000
    python benchmarks/distill_quality.py --images 60 --sizes teacher-2,2x96x2 --epochs 1

A student is "teacher-N" (thinned from the teacher: N of its blocks, evenly spaced, its
width; DINOv2-S: teacher-3 is 0.26x its FLOPs), "random" (distill's random default, 9x192x3
for DINOv2-S, about a fifth of its FLOPs), LAYERSxHIDDENxHEADS (random at that size) or
"default" (distill's own choice: teacher-3 for DINOv2-S). The issue's target: a student at
<= 1/4 of the teacher's FLOPs with recall@10 >= 0.9 on held-out queries.

Time on 2 CPU cores (a smoke run of 100 images, extrapolated): indexing 3,000 images with
the teacher ~11 minutes; the default student (0.21x the teacher's FLOPs, 4.1x its img/s)
trains at ~0.13 s an image in bf16, ~6 minutes an epoch over 2,700 training images, so 30
epochs ~3 hours per student: the default grid (3 sizes x 10 and 30 epochs) ~12 hours. On one
GPU, well under an hour in all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, count: int, seed: int) -> None:
    """Write `count` augmented views of scikit-image's sample photographs as JPEGs."""
    import skimage.data
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    from simsearch.models.onnx_validation import SAMPLE_PHOTOS

    photos = []
    for name in SAMPLE_PHOTOS:
        arr = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle"
            else getattr(skimage.data, name)()
        )
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        photos.append(Image.fromarray(arr).convert("RGB"))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        area = rng.uniform(0.15, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, np.sqrt(area * w * h * aspect)))
        ch = int(min(h, np.sqrt(area * w * h / aspect)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        if rng.random() < 0.3:
            view = view.rotate(float(rng.uniform(-15, 15)), expand=False)
        view = ImageEnhance.Color(view).enhance(float(rng.uniform(0.6, 1.4)))
        view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.7, 1.3)))
        view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(0.7, 1.3)))
        if rng.random() < 0.2:
            view = view.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        if rng.random() < 0.1:
            view = ImageOps.grayscale(view).convert("RGB")
        view.save(folder / f"view-{i:05d}.jpg", quality=int(rng.integers(75, 96)))


def parse_size(text: str) -> dict:
    """DistillConfig settings of a student: "default" (distill's own: thinned from the
    teacher where it can be, all its blocks at half its image size), "teacher-N" (thinned,
    N of the teacher's blocks), "random" (distill's random default size) or
    LAYERSxHIDDENxHEADS (random); any of them "@SIDE" for SIDE-px images ("teacher@112":
    every block up to the index's layer at 112 px)."""
    if "@" in text:
        text, side = text.split("@")
        return {**parse_size(text), "image_size": int(side)}
    if text == "teacher":
        return {"init": "teacher"}
    if text == "default":
        return {}
    if text == "random":
        return {"init": "random"}
    if text.startswith("teacher-"):
        return {"init": "teacher", "layers": int(text.removeprefix("teacher-"))}
    layers, hidden, heads = (int(x) for x in text.split("x"))
    return {"init": "random", "layers": layers, "hidden": hidden, "heads": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path("~/models/dinov2-small").expanduser()))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument(
        "--sizes",
        default="teacher-3,teacher-2,random",
        help="comma-separated students: default, teacher-N, random or LAYERSxHIDDENxHEADS",
    )
    parser.add_argument("--epochs", default="3", help="comma-separated epoch counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="[default: distill's per init]")
    parser.add_argument("--noise", type=float, default=None, help="[default: distill's]")
    parser.add_argument("--index-weight", type=float, default=None, help="[default: distill's]")
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep images/index here")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()

    from simsearch import Index
    from simsearch.train.distill import DistillConfig, distill

    work = args.work or Path(tempfile.mkdtemp(prefix="distill-bench-"))
    photos, index = work / "photos", work / "index"
    start = time.perf_counter()
    if not photos.is_dir():
        make_images(photos, args.images, args.seed)
    if not index.is_dir():
        with Index.create(index, model=args.model, backend="torch", precision="fp32") as idx:
            idx.add(photos)
    print(
        f"{args.images} images indexed with the teacher in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    try:
        for size in args.sizes.split(","):
            for epochs in (int(e) for e in args.epochs.split(",")):
                extra = {} if args.noise is None else {"noise": args.noise}
                if args.index_weight is not None:
                    extra["index_weight"] = args.index_weight
                out = work / (
                    f"student-{size}-{epochs}-{args.lr or 'lr'}-{args.noise}-{args.index_weight}"
                )
                shutil.rmtree(out, ignore_errors=True)
                config = DistillConfig(
                    **parse_size(size),
                    epochs=epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    **extra,
                    held_out=args.held_out,
                    seed=args.seed,
                )
                result = distill(index, out, config, device=args.device)
                line = {
                    "size": size,
                    "init": result.init,
                    "teacher_blocks": list(result.teacher_blocks),
                    "layers": result.layers,
                    "hidden": result.hidden,
                    "heads": result.heads,
                    "epochs": epochs,
                    # the rate it trained at, as the student's record says
                    "lr": json.loads((out / "simsearch_student.json").read_text())["lr"],
                    "noise": config.noise,
                    "index_weight": config.index_weight,
                    "image_size": result.image_size,
                    "flops_ratio": result.flops_ratio,
                    "recall_at_10": result.recall_at_10,
                    "mean_cosine": result.mean_cosine,
                    "student_img_s": result.student_images_per_second,
                    "teacher_img_s": result.teacher_images_per_second,
                    "train_seconds": result.seconds,
                    "train_images": result.train_images,
                    "held_out": result.held_out_images,
                    "device": result.device,
                    "precision": result.precision,
                }
                print(json.dumps(line), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(line) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
