"""The int8 file of an ONNX export: onnxruntime's dynamic quantisation of the SmoothQuant-scaled
model (smoothing.py), over the widest set of linear layers whose vectors still meet the bounds
(see onnx_export)."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from simsearch import config
from simsearch.errors import ModelExportError
from simsearch.models.onnx import ONNX_INT8_FILE, ONNX_MODEL_FILE, OUTPUT_NAME, _open_session
from simsearch.models.onnx_graph import _embedding_module, _torch_export
from simsearch.models.onnx_validation import recall_at_k, run_batches, session_runner
from simsearch.models.smoothing import SMOOTH_ALPHA, smooth

log = logging.getLogger(__name__)

# The int8 quantisation scopes tried in turn, smallest and fastest first; the first whose
# vectors meet INT8_MIN_COSINE and INT8_MIN_RECALL is kept. On DINOv2-S (docs/benchmarks.md)
# every linear layer, per-channel, already meets them: 3.5x smaller, 2.4x faster. The later
# scopes leave out the layers whose inputs carry outlier channels (the MLP output reads the
# GELU's), for models where that costs too much.
INT8_SCOPES = ("every linear layer", "all but the MLP output", "attention projections")

# Node names (from module paths) of MLP output projections: DINOv2, CLIP, SigLIP `mlp/fc2`;
# ViT, DeiT, BEiT `layer.N/output/dense` (not `attention/output/dense`).
MLP_OUTPUT = re.compile(r"mlp/fc2/|/output/dense/")
ATTENTION = re.compile(r"attention|attn")

# The SmoothQuant-scaled fp32 export the int8 file is quantised from, in the export's work
# folder; removed once it is.
SMOOTHED_DIR = "smoothed"
SMOOTHED_FILE = f"{SMOOTHED_DIR}/model.onnx"


def export_smoothed(
    work: Path, reference, pixels, opset: int, batch_size: int, progress, alpha=SMOOTH_ALPHA
) -> bool:
    """Export `reference`'s embedding path SmoothQuant-scaled (smoothing.py) by its
    activations on `pixels` to work/SMOOTHED_FILE, the fp32 file the int8 one is quantised
    from; False (the int8 file is then quantised from the plain export) when the model's
    blocks have no layout smoothing knows, or the scaled model does not compute what the
    original does, or scaling failed."""
    import torch

    module = _embedding_module(reference)
    sample = torch.from_numpy(np.ascontiguousarray(pixels[: min(len(pixels), batch_size)]))
    try:
        with torch.no_grad():
            before = module(sample).numpy()
        scaled = smooth(module, module.backbone, pixels, batch_size, alpha, progress)
        if scaled:
            with torch.no_grad():
                after = module(sample).numpy()
    except Exception as exc:  # a model smoothing does not know; int8 is still made
        log.warning("int8 without smoothing: scaling the model failed (%s)", exc)
        return False
    if not scaled:
        log.info("int8 without smoothing: no transformer block of a layout smoothing knows")
        if progress is not None:  # the calibration pass that was counted did not run
            progress.total -= len(pixels)
            progress.refresh()
        return False
    cosine = np.sum(before * after, axis=1)
    # An exact fold keeps cosine >= 0.9999998; NaN fails too.
    if not cosine.min() >= 1 - 1e-5:
        log.warning(
            "int8 without smoothing: the scaled model's vectors differ from the original's "
            "(lowest cosine %.6f)",
            cosine.min(),
        )
        return False
    # In a folder of its own: a model over 2 GB is written with its weights in files named
    # after them, which would overwrite model.onnx's.
    (work / SMOOTHED_DIR).mkdir()
    _torch_export(module, work / SMOOTHED_FILE, pixels[:2], OUTPUT_NAME, opset)
    return True


def quantise_int8(
    work: Path, reference, expected, pixels, opset: int, batch_size: int, source: str, progress
) -> dict:
    """Write model.int8.onnx with the widest INT8_SCOPES scope that stays faithful, and
    return its figures; raise ModelExportError when none does. It is quantised from
    `reference` SmoothQuant-scaled (export_smoothed) where that keeps its vectors, else from
    the fp32 export in `work`."""
    smoothed = export_smoothed(work, reference, pixels, opset, batch_size, progress)
    model_file = work / (SMOOTHED_FILE if smoothed else ONNX_MODEL_FILE)
    try:
        return _quantise(model_file, work, expected, pixels, batch_size, source, progress, smoothed)
    finally:
        shutil.rmtree(work / SMOOTHED_DIR, ignore_errors=True)


def _quantise(
    model_file: Path, work: Path, expected, pixels, batch_size, source, progress, smoothed
) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weighted = _weight_matmuls(onnx.load(str(model_file), load_external_data=False))
    tried: list[str] = []
    seen: set[frozenset] = set()
    for scope in INT8_SCOPES:
        nodes = _scope_nodes(scope, weighted)
        if not nodes or frozenset(nodes) in seen:
            continue
        seen.add(frozenset(nodes))
        target = work / ONNX_INT8_FILE
        with _quiet_quantiser():
            quantize_dynamic(
                model_file,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,  # a scale per output channel: fewer weights clipped
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes,
            )
        session, _ = _open_session(target, "cpu")
        if tried and progress is not None:
            progress.total += len(pixels)
            progress.refresh()
        got = run_batches(session_runner(session, OUTPUT_NAME), pixels, batch_size, progress)
        del session
        cosine = np.sum(got * expected, axis=1)
        recall = recall_at_k(expected, got, 10)
        figures = {
            "int8_scope": scope,
            "int8_smoothing": SMOOTH_ALPHA if smoothed else None,
            "int8_min_cosine": round(float(cosine.min()), 5),
            "int8_mean_cosine": round(float(cosine.mean()), 5),
            "int8_recall_at_10": round(recall, 3),
        }
        if cosine.min() >= config.INT8_MIN_COSINE and recall >= config.INT8_MIN_RECALL:
            return figures
        log.info(
            "int8 with %s quantised is not faithful enough (lowest cosine %.4f, recall@10 "
            "%.3f); trying fewer layers",
            scope,
            cosine.min(),
            recall,
        )
        tried.append(
            f"{scope}: lowest cosine {cosine.min():.4f}, recall@10 {recall:.3f}",
        )
        target.unlink()
    raise ModelExportError(
        f"int8 quantisation changes this model's vectors too much on {source} (need lowest "
        f"cosine >= {config.INT8_MIN_COSINE} and recall@10 >= {config.INT8_MIN_RECALL}; "
        + "; ".join(tried or ["no linear layers to quantise"])
        + "): export without int8",
        param="int8",
    )


def _weight_matmuls(graph_model) -> list[str]:
    """Return the names of the MatMul nodes that multiply by a weight (a linear layer)."""
    weights = {init.name for init in graph_model.graph.initializer}
    return [
        node.name
        for node in graph_model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights
    ]


def _scope_nodes(scope: str, weighted: list[str]) -> list[str]:
    if scope == "every linear layer":
        return list(weighted)
    if scope == "all but the MLP output":
        return [n for n in weighted if ATTENTION.search(n) or not MLP_OUTPUT.search(n)]
    return [n for n in weighted if ATTENTION.search(n)]


@contextlib.contextmanager
def _quiet_quantiser():
    """Silence the quantiser's advice to pre-process the model first (it logs through the
    root logger): on these graphs its shape inference changed neither speed nor vectors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
