"""Whole commands, start-up included: every embedding path of `simsearch index` against the
loop a user writes, on the same JPEGs, each into a new index.

  loop          AutoImageProcessor + AutoModel, one image at a time, fp32 (a new process)
  default       `simsearch index DIR`: --backend auto; the first run with an empty cache
                (where auto picks ONNX it exports the model once: that time is in it),
                then again, as every later new index of the model
  onnx          `--backend onnx`: the model's cached export, fp32
  torch         `--backend torch` (precision auto: bf16 on CPUs with native bf16) and
                `--backend torch --precision fp32`
  onnx int8     `--backend onnx --precision int8` with an `export-model --int8` folder

    python benchmarks/default_path.py --model ~/models/dinov2-small --images 240
    python benchmarks/default_path.py --model ~/models/dinov2-small --isa AVX512_CORE_BF16

Each path runs --repeat times, the paths taking turns; the best is kept. Prints a Markdown
table and JSON lines. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from index_speed import make_photos

LOOP = """
import sys, time, torch
from pathlib import Path
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
model, files = sys.argv[1], sorted(Path(sys.argv[2]).glob("*.jpg"))
processor = AutoImageProcessor.from_pretrained(model)
net = AutoModel.from_pretrained(model).eval()
with torch.inference_mode():
    for f in files:
        inputs = processor(images=Image.open(f).convert("RGB"), return_tensors="pt")
        v = net(**inputs).last_hidden_state[:, 0]
        v = v / v.norm()
"""


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (real weights)")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--size", default="1600x1200", help="WxH of the generated JPEGs")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="keep the JPEGs here")
    parser.add_argument(
        "--isa",
        help="ONEDNN_MAX_CPU_ISA for every command: AVX512_CORE_BF16 runs torch as on a CPU "
        "with AVX512-BF16 but no AMX, AVX512_CORE as on one with no bf16 at all",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="simsearch-default-"))
    try:
        photos = args.data or work / "photos"
        if len(list(photos.glob("*.jpg"))) != args.images:
            shutil.rmtree(photos, ignore_errors=True)
            make_photos(photos, args.images, tuple(int(v) for v in args.size.split("x")))
        n = len(list(photos.glob("*.jpg")))
        cache = work / "cache"
        env = {**os.environ, "SIMSEARCH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
        for var in ("SIMSEARCH_BACKEND", "SIMSEARCH_PRECISION", "ONEDNN_MAX_CPU_ISA"):
            env.pop(var, None)
        if args.isa:
            env["ONEDNN_MAX_CPU_ISA"] = args.isa
        simsearch = [sys.executable, "-m", "simsearch", "-q", "index", str(photos)]
        export = work / "int8-export"
        export_cmd = [sys.executable, "-m", "simsearch", "-q", "export-model", "--model",
                      args.model, "--output", str(export), "--int8"]  # fmt: skip
        export_s = timed(export_cmd, env)

        runs = 0

        def index(*options: str) -> list[str]:
            nonlocal runs
            runs += 1
            return [*simsearch, "--index", str(work / f"index-{runs}"), *options]

        first = timed(index("--model", args.model), env)  # empty cache: exports once
        info = subprocess.run(
            [sys.executable, "-m", "simsearch", "info", "--index", str(work / "index-1"),
             "--json"], env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        chosen = json.loads(info.stdout)["precision"]
        paths = {
            "loop": lambda: [sys.executable, "-c", LOOP, args.model, str(photos)],
            f"default (auto: {chosen})": lambda: index("--model", args.model),
            "--backend onnx (fp32, export cached)": lambda: index(
                "--model", args.model, "--backend", "onnx"
            ),
            "--backend torch (auto precision)": lambda: index(
                "--model", args.model, "--backend", "torch"
            ),
            "--backend torch --precision fp32": lambda: index(
                "--model", args.model, "--backend", "torch", "--precision", "fp32"
            ),
            "--backend onnx --precision int8": lambda: index(
                "--model", str(export), "--backend", "onnx", "--precision", "int8"
            ),
        }
        best = {name: float("inf") for name in paths}
        for _ in range(args.repeat):
            for name, argv in paths.items():
                best[name] = min(best[name], timed(argv(), env))
        loop = n / best["loop"]
        print(json.dumps({"images": n, "size": args.size, "cores": os.cpu_count(),
                          "isa": args.isa, "default": chosen,
                          "export_model_int8_s": round(export_s, 1)}))  # fmt: skip
        print("| path | seconds | img/s | vs the loop |")
        print("|---|---|---|---|")
        rows = [(f"default, first run ({chosen}; onnx: exports the model)", first),
                *best.items()]  # fmt: skip
        for name, seconds in rows:
            rate = n / seconds
            print(f"| {name} | {seconds:.1f} | {rate:.2f} | {rate / loop:.2f}x |")
            print(json.dumps({"path": name, "seconds": round(seconds, 2),
                              "img_s": round(rate, 2)}), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
