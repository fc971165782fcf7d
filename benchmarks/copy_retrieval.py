"""Do edited copies of real photographs find their originals? A retrieval sanity check.

Indexes scikit-image's sample photographs with a real model, then queries with edited copies
of each (crop + mirror, downscale + heavy JPEG, brightness, small rotation, grey) and reports
how often the original ranks first, plus each original's nearest other photo.

    python benchmarks/copy_retrieval.py --model ~/models/dinov2-small

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from simsearch.models.onnx_validation import SAMPLE_PHOTOS

PHOTOS = SAMPLE_PHOTOS


def _load(name: str):
    import skimage.data
    from PIL import Image

    if name == "motorcycle":
        arr = skimage.data.stereo_motorcycle()[0]
    else:
        arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = (arr * 255).astype(np.uint8)
    elif arr.dtype.kind == "f":  # pictures drawn in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def edits(img):
    """Yield (name, edited copy) pairs: the edits people make to photos they keep twice."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    yield (
        "crop+mirror",
        ImageOps.mirror(img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9)))),
    )
    small = img.resize((max(w // 3, 16), max(h // 3, 16)))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=40)
    from PIL import Image

    yield "downscale+jpeg40", Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    yield "brighter", ImageEnhance.Brightness(img).enhance(1.3)
    yield "rotate5", img.rotate(5, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    yield "grey", ImageOps.grayscale(img).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--pool", default="cls", choices=["cls", "mean"])
    parser.add_argument("--layer", type=int, default=-1)
    args = parser.parse_args()

    from simsearch import Index
    from simsearch.cli.render import add_line

    work = Path(tempfile.mkdtemp(prefix="simsearch-copies-"))
    try:
        originals = work / "photos"
        originals.mkdir()
        queries = []
        for name in PHOTOS:
            img = _load(name)
            img.save(originals / f"{name}.jpg", quality=92)
            queries += [(name, kind, copy) for kind, copy in edits(img)]
        with Index.create(
            work / "index", model=args.model, layer=args.layer, pool=args.pool
        ) as index:
            print(add_line(index.add(originals)))
            results = index.search_many([copy for _, _, copy in queries], k=len(PHOTOS))
            per_kind: dict[str, list[int]] = {}
            for (name, kind, _), hits in zip(queries, results, strict=True):
                rank = next(i for i, h in enumerate(hits, 1) if Path(h.path).stem == name)
                per_kind.setdefault(kind, []).append(rank)
                if rank != 1:
                    print(
                        f"  miss: {kind} copy of {name} -> {Path(hits[0].path).stem} "
                        f"({hits[0].score:.3f}); original at rank {rank}"
                    )
            print("| edit | top-1 | mean rank of original |")
            print("|---|---|---|")
            for kind, ranks in per_kind.items():
                r = np.array(ranks)
                print(f"| {kind} | {np.mean(r == 1):.2f} | {r.mean():.2f} |")
            total = np.concatenate([np.array(v) for v in per_kind.values()])
            print(
                f"| all ({len(total)} queries) | {np.mean(total == 1):.2f} | {total.mean():.2f} |"
            )
            print("\nnearest other photo of each original:")
            for name in PHOTOS:
                hits = index.search(originals / f"{name}.jpg", k=2)
                print(f"  {name:22s} -> {Path(hits[1].path).stem:22s} {hits[1].score:.3f}")
            print(
                json.dumps(
                    {
                        "model": Path(args.model).name,
                        "pool": args.pool,
                        "layer": args.layer,
                        "queries": len(total),
                        "top1": round(float(np.mean(total == 1)), 3),
                    }
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
