"""How fast and how faithful the ONNX Runtime backend is, against PyTorch, on one model.

Exports --model with --int8 (or uses --export, a folder `simsearch export-model` made), then
on the same JPEGs (benchmarks/index_speed.py's crops of scikit-image's photographs) measures
for PyTorch fp32, PyTorch auto (bf16 on CPUs with native bf16), ONNX fp32 and ONNX int8:

  model only   forward passes on pixels preprocessed beforehand, batch --batch; the best of
               --rounds passes, the backends taking turns
  end to end   Index.add of the JPEGs into a new index (reading, decoding, model, writes)
  faithful     mean and lowest cosine to PyTorch fp32's vector of the same image, and
               recall@10 of PyTorch fp32's neighbours among the images

    python benchmarks/onnx_speed.py --model ~/models/dinov2-small --data /tmp/bench-photos

Prints a Markdown table and JSON lines. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from index_speed import make_photos

PHOTO_SIZE = (1600, 1200)  # index_speed.py's default: a phone photo's size class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (real weights)")
    parser.add_argument("--export", type=Path, help="its ONNX export (made with --int8)")
    parser.add_argument("--data", type=Path, required=True, help="folder of JPEGs (made)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="model-only passes; best kept")
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()

    import torch

    from simsearch import Index
    from simsearch.cli.render import export_lines
    from simsearch.media.decode import decode_image
    from simsearch.models.embed import Embedder
    from simsearch.models.onnx import OnnxEmbedder
    from simsearch.models.onnx_export import export_model, recall_at_k

    work = Path(tempfile.mkdtemp(prefix="onnx-speed-"))
    try:
        if len(list(args.data.glob("*.jpg"))) < args.images:
            make_photos(args.data, args.images, PHOTO_SIZE)
        files = sorted(args.data.glob("*.jpg"))[: args.images]
        export = args.export
        if export is None:
            export = work / "export"
            start = time.perf_counter()
            result = export_model(args.model, export, int8=True, batch_size=args.batch)
            print(f"export-model --int8: {time.perf_counter() - start:.1f} s")
            print("\n".join(export_lines(result)))

        backends = {
            "PyTorch fp32": lambda: Embedder(args.model, precision="fp32", batch_size=args.batch),
            "PyTorch auto": lambda: Embedder(args.model, precision="auto", batch_size=args.batch),
            "ONNX fp32": lambda: OnnxEmbedder(export, precision="fp32", batch_size=args.batch),
            "ONNX int8": lambda: OnnxEmbedder(export, precision="int8", batch_size=args.batch),
        }
        print(
            f"\n{len(files)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, batch {args.batch}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n"
        )
        print(
            "| backend | precision | model only (img/s) | end to end (img/s) | "
            "mean cosine to PyTorch fp32 | lowest | recall@10 |"
        )
        print("|---|---|---|---|---|---|---|")
        embedders = {name: make() for name, make in backends.items()}
        pre = embedders["PyTorch fp32"].preprocess
        pixels = np.stack([pre(decode_image(f.read_bytes(), draft=pre)) for f in files])

        def model_only(embedder):
            start = time.perf_counter()
            vectors = np.concatenate(
                [
                    embedder.embed_pixels(pixels[i : i + args.batch])
                    for i in range(0, len(pixels), args.batch)
                ]
            )
            return vectors, len(pixels) / (time.perf_counter() - start)

        # Rounds interleave the backends and each keeps its best: on a shared machine, load
        # from other processes comes and goes, and would otherwise favour whoever ran when
        # it was quiet.
        speed = dict.fromkeys(embedders, 0.0)
        vectors = {}
        for embedder in embedders.values():
            embedder.embed_pixels(pixels[: args.batch])  # warm-up: allocations, kernels
        for _ in range(args.rounds):
            for name, embedder in embedders.items():
                vectors[name], img_s = model_only(embedder)
                speed[name] = max(speed[name], img_s)
        reference = vectors["PyTorch fp32"]
        rows = []
        for name, embedder in embedders.items():
            cosine = np.sum(vectors[name] * reference, axis=1)
            end_to_end = None
            if not args.no_end_to_end:
                index_dir = work / name.replace(" ", "-")
                with Index.create(index_dir, embedder=embedder) as index:
                    start = time.perf_counter()
                    index.add(files)
                    end_to_end = len(files) / (time.perf_counter() - start)
                shutil.rmtree(index_dir)
            row = {
                "backend": name,
                "precision": embedder.precision,
                "model_only_img_s": round(speed[name], 2),
                "end_to_end_img_s": None if end_to_end is None else round(end_to_end, 2),
                "mean_cosine": round(float(cosine.mean()), 5),
                "min_cosine": round(float(cosine.min()), 5),
                "recall_at_10": round(recall_at_k(reference, vectors[name], 10), 3),
            }
            rows.append(row)
            e2e = "" if end_to_end is None else f"{end_to_end:.2f}"
            print(
                f"| {name} | {row['precision']} | {speed[name]:.2f} | {e2e} | "
                f"{row['mean_cosine']:.5f} | {row['min_cosine']:.5f} | "
                f"{row['recall_at_10']:.3f} |",
                flush=True,
            )
        print()
        for row in rows:
            print(json.dumps({**row, "images": len(files), "batch": args.batch}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
