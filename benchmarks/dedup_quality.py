"""Dedup precision and recall at the calibrated threshold, on copies of real photographs.

Makes a library of distinct images from scikit-image's sample photographs (each photo, and
the four quadrants of the photos of scenes: different pictures of the same scene, like
burst shots, the hard case; the texture samples' quadrants would be the same picture
again, so they are left out), plants a copy of every other image made the way copies are
made in real life (a downsized JPEG, a trimmed crop, a re-save with a border, a brightened
re-encode, a phone-style resize + recompress), indexes everything with a real model, calibrates the
threshold, runs dedup, and scores the pairs it grouped against the planted ones.

    python benchmarks/dedup_quality.py --model ~/models/dinov2-small

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

from copy_retrieval import PHOTOS, _load
from PIL import Image, ImageEnhance, ImageOps

# Photographs of scenes, whose quarters are different pictures (the others are textures,
# micrographs and pages, whose quarters look like each other).
SCENES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "clock", "motorcycle")


def library(folder: Path) -> list[Path]:
    """Write the distinct images; return their paths."""
    paths = []
    for name in PHOTOS:
        img = _load(name)
        w, h = img.size
        parts = {"whole": img}
        quarters = itertools.product((0, 1), (0, 1)) if name in SCENES else []
        for i, (x, y) in enumerate(quarters):
            parts[f"q{i}"] = img.crop((x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
        for part, picture in parts.items():
            path = folder / f"{name}-{part}.jpg"
            picture.save(path, quality=92)
            paths.append(path)
    return paths


def real_copy(img: Image.Image, kind: int) -> Image.Image:
    """A copy as people make them: not the calibration's own edits and strengths."""
    w, h = img.size
    if kind == 0:  # downsized for e-mail
        img = img.resize((max(16, w // 2), max(16, h // 2)), Image.Resampling.LANCZOS)
    elif kind == 1:  # trimmed
        img = img.crop((int(w * 0.06), int(h * 0.04), int(w * 0.95), int(h * 0.97)))
    elif kind == 2:  # posted with a frame
        img = ImageOps.expand(img, border=max(4, min(w, h) // 20), fill=(255, 255, 255))
    elif kind == 3:  # "enhanced"
        img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.15)).enhance(1.1)
    else:  # a messenger's resize and recompression
        img = img.resize((max(16, int(w * 0.7)), max(16, int(h * 0.7))))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--sample", type=int, default=100, help="calibration sample")
    args = parser.parse_args()

    from simsearch import Index

    work = Path(tempfile.mkdtemp(prefix="simsearch-dedup-quality-"))
    try:
        photos = work / "photos"
        photos.mkdir()
        originals = library(photos)
        truth = set()
        for n, path in enumerate(originals[::2]):
            copy = photos / "copies" / f"{path.stem}-copy.jpg"
            copy.parent.mkdir(exist_ok=True)
            real_copy(Image.open(path).convert("RGB"), n % 5).save(copy, quality=85)
            truth.add(frozenset({str(path), str(copy)}))
        with Index.create(work / "index", model=args.model) as index:
            print(index.add(photos).line())
            started = time.perf_counter()
            calibration = index.calibrate_dedup(sample=args.sample)
            seconds = time.perf_counter() - started
            print(calibration.line())
            groups = index.duplicates()
        # Scored as dedup acts: each (kept image, duplicate) pair it reports.
        found = {frozenset({g.keep_path, d.path}) for g in groups for d in g.duplicates}
        hits = found & truth
        precision = len(hits) / len(found) if found else 1.0
        recall = len(hits) / len(truth)
        for pair in sorted(found - truth, key=sorted):
            print("  false pair:", *(Path(p).name for p in sorted(pair)))
        for pair in sorted(truth - found, key=sorted):
            print("  missed:    ", *(Path(p).name for p in sorted(pair)))
        print(
            json.dumps(
                {
                    "model": Path(args.model).name,
                    "images": len(originals) + len(truth),
                    "planted_pairs": len(truth),
                    "threshold": calibration.threshold,
                    "expected_precision": calibration.precision,
                    "expected_recall": calibration.recall,
                    "precision": round(precision, 3),
                    "recall": round(recall, 3),
                    "calibration_seconds": round(seconds, 1),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
