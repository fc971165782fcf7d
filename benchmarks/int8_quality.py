"""Which int8 quantisation of an ONNX export keeps the neighbours: recall@10 and lowest
cosine against the fp32 export, and model-only speed, per method.

Methods (onnxruntime.quantization, MatMul weights per output channel):

  dynamic-all        what `export-model --int8` writes on DINOv2-S: activations quantised
                     per batch at run time, every linear layer
  dynamic-no-mlp-out the same, the MLP output projections (whose input carries the GELU's
                     outlier channels) left in fp32
  dynamic-attention  attention projections only
  static-minmax      static QDQ, activations' ranges calibrated on --calibrate images of the
                     collection itself (MinMax), every linear layer
  static-percentile  the same, ranges at the 99.999th percentile (outliers clipped)
  static-no-mlp-out  static MinMax, MLP output projections left in fp32
  smooth-all         SmoothQuant-scaled (simsearch/models/smoothing.py, alpha --alpha) by the
                     activations on the --calibrate images, then dynamic, every linear layer
  smooth-no-mlp-out  the same, MLP output projections left in fp32
  smooth-all-views   smooth-all scaled by scikit-image's 108 validation views instead, as
                     `export-model --int8` makes it (no image of the collection seen)
  smooth-no-mlp-out-views

The issue's bar for `--backend auto` to take int8: recall@10 >= 0.97 against fp32.

    python benchmarks/int8_quality.py --model ~/models/dinov2-small --data /tmp/dpath/photos

Prints a Markdown table and JSON lines. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (real weights)")
    parser.add_argument("--data", type=Path, required=True, help="folder of JPEGs")
    parser.add_argument("--images", type=int, default=240, help="images to measure on")
    parser.add_argument("--calibrate", type=int, default=48, help="images to calibrate on")
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant's alpha")
    parser.add_argument("--only", help="comma-separated methods to run (default: all)")
    args = parser.parse_args()

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from simsearch.config import DEFAULT_OPSET
    from simsearch.media.decode import decode_image
    from simsearch.models.embed import Embedder
    from simsearch.models.onnx import INPUT_NAME, OUTPUT_NAME, _open_session
    from simsearch.models.onnx_cache import cached_export
    from simsearch.models.onnx_int8 import (
        ATTENTION,
        MLP_OUTPUT,
        SMOOTHED_FILE,
        _weight_matmuls,
        export_smoothed,
    )
    from simsearch.models.onnx_validation import (
        recall_at_k,
        run_batches,
        session_runner,
        stack_pixels,
        validation_images,
    )
    from simsearch.models.provider import onnx_embedder
    from simsearch.models.smoothing import SMOOTH_ALPHA

    fp32 = onnx_embedder(args.model, None, None, "cpu", "fp32", 16)
    files = sorted(args.data.glob("*.jpg"))
    pre = fp32.preprocess
    pixels = np.stack([pre(decode_image(f.read_bytes(), draft=pre)) for f in files])
    # Calibrate on images not measured on when there are enough, else on the first ones.
    calib = pixels[-args.calibrate :] if len(pixels) > args.images else pixels[: args.calibrate]
    pixels = pixels[: args.images]
    model_file = cached_export(args.model) / "model.onnx"
    expected = run_batches(fp32.embed_pixels, pixels, 16)

    import onnx

    weighted = _weight_matmuls(onnx.load(str(model_file), load_external_data=False))
    no_mlp_out = [n for n in weighted if ATTENTION.search(n) or not MLP_OUTPUT.search(n)]
    attention = [n for n in weighted if ATTENTION.search(n)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    work = Path(tempfile.mkdtemp(prefix="simsearch-int8-"))
    try:

        def dynamic(nodes, smoothed_on: str | None = None):
            """Dynamic int8 of `nodes`, from the export smoothed on "own" or "views" if
            asked (the smoothed export's nodes have the same names)."""

            def make(out):
                quantize_dynamic(
                    model_file if smoothed_on is None else smoothed(smoothed_on),
                    out,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes,
                )

            return make

        def static(method, nodes):
            def make(out):
                quantize_static(model_file, out, Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                nodes_to_quantize=nodes, calibrate_method=method,
                                extra_options={"ActivationSymmetric": True})  # fmt: skip

            return make

        alpha = SMOOTH_ALPHA if args.alpha is None else args.alpha
        reference = Embedder(args.model, device="cpu", precision="fp32", batch_size=16)
        views = stack_pixels(validation_images(None)[0], reference.preprocess)
        smoothed_files: dict[str, Path] = {}

        def smoothed(on: str) -> Path:
            if on not in smoothed_files:
                folder = work / f"smoothed-{on}"
                folder.mkdir()
                images = calib if on == "own" else views
                if not export_smoothed(folder, reference, images, DEFAULT_OPSET, 16, None, alpha):
                    raise SystemExit(f"{args.model} cannot be smoothed (see the log)")
                smoothed_files[on] = folder / SMOOTHED_FILE
            return smoothed_files[on]

        methods = {
            "dynamic-all": dynamic(weighted),
            "dynamic-no-mlp-out": dynamic(no_mlp_out),
            "dynamic-attention": dynamic(attention),
            "static-minmax": static(CalibrationMethod.MinMax, weighted),
            "static-percentile": static(CalibrationMethod.Percentile, weighted),
            "static-no-mlp-out": static(CalibrationMethod.MinMax, no_mlp_out),
            "smooth-all": dynamic(weighted, "own"),
            "smooth-no-mlp-out": dynamic(no_mlp_out, "own"),
            "smooth-all-views": dynamic(weighted, "views"),
            "smooth-no-mlp-out-views": dynamic(no_mlp_out, "views"),
        }
        if args.only:
            methods = {k: v for k, v in methods.items() if k in args.only.split(",")}
        print("| method | recall@10 vs fp32 | lowest cosine | mean cosine | model only img/s |")
        print("|---|---|---|---|---|")
        session, _ = _open_session(model_file, "cpu")
        rate = _speed(session_runner(session, OUTPUT_NAME), pixels[:32])
        print(f"| fp32 | 1 | 1 | 1 | {rate:.1f} |", flush=True)
        for name, make in methods.items():
            out = work / f"{name}.onnx"
            start = time.perf_counter()
            make(out)
            made_s = time.perf_counter() - start
            session, _ = _open_session(out, "cpu")
            run = session_runner(session, OUTPUT_NAME)
            got = run_batches(run, pixels, 16)
            got /= np.linalg.norm(got, axis=1, keepdims=True)
            cosine = np.sum(got * expected, axis=1)
            recall = recall_at_k(expected, got, 10)
            rate = _speed(run, pixels[:32])
            print(f"| {name} | {recall:.3f} | {cosine.min():.4f} | {cosine.mean():.5f} | "
                  f"{rate:.1f} |", flush=True)  # fmt: skip
            print(json.dumps({"method": name, "alpha": alpha if "smooth" in name else None,
                              "recall_at_10": round(recall, 4),
                              "min_cosine": round(float(cosine.min()), 5),
                              "mean_cosine": round(float(cosine.mean()), 6),
                              "img_s": round(rate, 2), "made_s": round(made_s, 1)}),
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _speed(run, batch) -> float:
    run(batch[:4])
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        run(batch)
        best = max(best, len(batch) / (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    main()
