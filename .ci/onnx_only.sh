#!/usr/bin/env bash
# The ONNX-only install the README gives, in a fresh venv: no torch, no transformers, and an
# export made elsewhere indexes and searches. Needs the dev venv (.venv) to make the export.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The model side, with the dev venv: a tiny ViT, exported to ONNX.
.venv/bin/python - "$work/vit" <<'PY'
import sys
import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel
torch.manual_seed(0)  # a random model: the same one every run
config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, image_size=32, patch_size=8)
ViTModel(config, add_pooling_layer=False).save_pretrained(sys.argv[1])
ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(sys.argv[1])
PY
.venv/bin/simsearch -q export-model --model "$work/vit" --output "$work/export" >/dev/null

# The install, exactly as README.md gives it (the first pip line after "ONNX-only install").
python3 -m venv "$work/venv"
install=$(awk '/ONNX-only install/ {found = 1} found && /^pip install/ {print; exit}' README.md)
[ -n "$install" ] || { echo "FAIL: no ONNX-only install line in README.md" >&2; exit 1; }
echo "+ $install" >&2
if ! (PATH="$work/venv/bin:$PATH"; eval "$install") >"$work/pip.log" 2>&1; then
    tail -n 20 "$work/pip.log" >&2
    exit 1
fi
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "FAIL: the ONNX-only install pulled torch" >&2; exit 1
fi
if "$work/venv/bin/python" -c "import transformers" 2>/dev/null; then
    echo "FAIL: the ONNX-only install pulled transformers" >&2; exit 1
fi
mkdir "$work/photos"
cp examples/photos/*.jpg "$work/photos/"
"$work/venv/bin/simsearch" -q index "$work/photos" --index "$work/index" --backend onnx --model "$work/export"
# A random tiny model ranks an edited copy first only by luck (CI once saw it miss): the
# photo itself must come first, at score 1.
"$work/venv/bin/simsearch" search examples/photos/chelsea.jpg --index "$work/index" -k 1 --json \
    | grep -q chelsea.jpg
echo "onnx-only install: no torch, indexes and searches ($((SECONDS - start)) s)" >&2
