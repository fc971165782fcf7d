"""Does fine-tuning help? Validation accuracy before (kNN and a linear probe on the frozen
backbone's vectors) and after `simsearch finetune`, on a small real labelled set.

The set is scikit-learn's handwritten digits (8x8 scans of 10 classes, shipped with the
package: no download), upscaled to 64 px as dark digits on white, `--per-class` training and
20 validation images a class. A backbone pre-trained on photographs has never been asked to
tell a 3 from an 8, so this is the case fine-tuning is for.

    pip install scikit-learn     # for the digits only
    python benchmarks/finetune_quality.py --model ~/models/dinov2-small

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_digits(folder: Path, per_class: int, val_per_class: int, seed: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == label))
        for split, picks in (
            ("train", chosen[:per_class]),
            ("val", chosen[per_class : per_class + val_per_class]),
        ):
            out = folder / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            for i in picks:
                ink = (digits.images[i] / 16.0 * 255).astype(np.uint8)
                img = Image.fromarray(255 - ink).resize((64, 64), Image.Resampling.BICUBIC)
                img.convert("RGB").save(out / f"{i}.png")


def vectors(model: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embed every image under folder/<class>/ with `model`; return (vectors, labels)."""
    from simsearch.models.embed import Embedder

    embedder = Embedder(model, precision="fp32")
    paths = sorted(folder.glob("*/*.png"))
    return embedder.embed_images([_open(p) for p in paths]), np.array(
        [int(p.parent.name) for p in paths]
    )


def _open(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def knn_accuracy(train, train_y, val, val_y, k: int = 5) -> float:
    nearest = np.argsort(-(val @ train.T), axis=1)[:, :k]
    votes = train_y[nearest]
    guess = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float(np.mean(guess == val_y))


def probe_accuracy(train, train_y, val, val_y, ridge: float = 1.0) -> float:
    """A linear probe: ridge regression onto one-hot classes (closed form)."""
    x = np.hstack([train, np.ones((len(train), 1))])
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ np.eye(10)[train_y])
    guess = (np.hstack([val, np.ones((len(val), 1))]) @ w).argmax(axis=1)
    return float(np.mean(guess == val_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local backbone folder")
    parser.add_argument("--per-class", type=int, default=30, help="training images a class")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from simsearch.cli.render import epoch_line
    from simsearch.train.finetune import FinetuneConfig, finetune

    work = Path(tempfile.mkdtemp(prefix="simsearch-finetune-quality-"))
    try:
        write_digits(work / "digits", args.per_class, 20, seed=0)
        train_dir, val_dir = work / "digits" / "train", work / "digits" / "val"
        before = vectors(args.model, train_dir), vectors(args.model, val_dir)
        started = time.perf_counter()
        config = FinetuneConfig(
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            val_dir=str(val_dir),
            seed=0,
        )
        result = finetune(train_dir, work / "tuned", config)
        seconds = time.perf_counter() - started
        for record in result.history:
            print(epoch_line(record, result.epochs_run))
        after = vectors(str(work / "tuned"), train_dir), vectors(str(work / "tuned"), val_dir)
        figures = {
            "model": Path(args.model).name,
            "train_images": result.train_images,
            "val_images": result.val_images,
            "knn_before": knn_accuracy(*before[0], *before[1]),
            "probe_before": probe_accuracy(*before[0], *before[1]),
            "head_after": result.best_accuracy,
            "knn_after": knn_accuracy(*after[0], *after[1]),
            "probe_after": probe_accuracy(*after[0], *after[1]),
            "best_epoch": result.best_epoch,
            "epochs": result.epochs_run,
            "finetune_seconds": round(seconds, 1),
            "peak_rss_gib": round((result.peak_memory_bytes or 0) / 2**30, 2),
        }
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
