"""How faithful each precision's vectors are to fp32's, on real photographs and a real model.

For every precision: the mean and lowest cosine between its vector and fp32's for the same
image, and recall@10: how many of each image's 10 nearest neighbours under fp32 it keeps.
Images: the JPEGs that benchmarks/index_speed.py makes (random crops of scikit-image's
photographs, so each image has close neighbours that small errors could reorder).

    python benchmarks/faithfulness.py --model ~/models/dinov2-small --data /tmp/bench-photos

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def recall_at_10(reference: np.ndarray, other: np.ndarray) -> float:
    def neighbours(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    ref, got = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (real weights)")
    parser.add_argument("--data", type=Path, required=True, help="folder of JPEGs")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--precisions", default="bf16,fp16,int8")
    args = parser.parse_args()

    from simsearch.media.decode import decode_image
    from simsearch.models.embed import Embedder

    files = sorted(args.data.glob("*.jpg"))[: args.images]
    fp32 = Embedder(args.model, precision="fp32")
    pre = fp32.preprocess
    pixels = np.stack([pre(decode_image(f.read_bytes(), draft=pre)) for f in files])

    def run(embedder):
        embedder.embed_pixels(pixels[:32])  # warm-up
        start = time.perf_counter()
        vecs = np.concatenate(
            [embedder.embed_pixels(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]
        )
        return vecs, len(pixels) / (time.perf_counter() - start)

    reference, speed = run(fp32)
    print("| precision | mean cosine to fp32 | lowest cosine | recall@10 vs fp32 | img/s |")
    print(f"| fp32 | 1 | 1 | 1 | {speed:.2f} |")
    for precision in args.precisions.split(","):
        vecs, speed = run(Embedder(args.model, precision=precision))
        cos = np.sum(vecs * reference, axis=1)
        recall = recall_at_10(reference, vecs)
        print(f"| {precision} | {cos.mean():.5f} | {cos.min():.5f} | {recall:.3f} | {speed:.2f} |")
        print(
            json.dumps(
                {
                    "precision": precision,
                    "mean_cosine": round(float(cos.mean()), 6),
                    "min_cosine": round(float(cos.min()), 6),
                    "recall_at_10": recall,
                    "img_s": round(speed, 2),
                    "images": len(files),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
