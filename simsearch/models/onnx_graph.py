"""What an ONNX export holds: the embedding path as one traceable torch module, the
checkpoint's classification head, and torch's exporter run on each (see onnx_export)."""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from simsearch import config
from simsearch.errors import ModelExportError, ModelLoadError, first_line
from simsearch.models.hub import FINAL_NORM_NAMES, load_backbone, load_classifier
from simsearch.models.onnx import INPUT_NAME, OUTPUT_NAME, _open_session
from simsearch.models.onnx_validation import run_batches, session_runner

log = logging.getLogger(__name__)


def export_embedding(reference, path: Path, sample: np.ndarray, opset: int) -> None:
    """Export the embedding path of `reference` (an Embedder) to `path`, traced on `sample`."""
    if reference.pool == "cls":
        reference.embed_pixels(sample)  # raises LayerError for a model with no [CLS] token
    _torch_export(_embedding_module(reference), path, sample, OUTPUT_NAME, opset)


def _embedding_module(reference):
    """Return a torch module computing `reference`'s vectors in one traceable forward.

    The Embedder stops its forward pass with a hook that raises, which cannot be traced; this
    asks a fresh copy of the backbone for all hidden states instead and keeps the wanted one
    (the exporter drops the blocks after it, which no output depends on).
    """
    import torch

    backbone, _ = load_backbone(reference.folder)
    final_norm = None
    if reference.final_norm is not None:
        final_norm = next(getattr(backbone, n) for n in FINAL_NORM_NAMES if hasattr(backbone, n))
    # A student's projection into its teacher's space (a copy: the reference keeps its own).
    projection = copy.deepcopy(reference.projection)

    class EmbeddingPath(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.final_norm = final_norm
            self.projection = projection

        def forward(self, pixel_values):
            out = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
            tokens = out.hidden_states[reference.layer]
            if self.final_norm is not None:
                tokens = self.final_norm(tokens)
            patches = reference._num_patches(pixel_values.shape[-2], pixel_values.shape[-1])
            prefix = tokens.shape[1] - patches
            if reference.pool == "cls":
                vectors = tokens[:, 0]
            else:
                vectors = tokens[:, max(prefix, 0) :].mean(dim=1)
            if self.projection is not None:
                vectors = self.projection(vectors)
            return torch.nn.functional.normalize(vectors, dim=-1)

    return EmbeddingPath().eval()


def export_classifier(
    reference, path: Path, pixels: np.ndarray, opset: int, batch_size: int
) -> dict | None:
    """Export the checkpoint's classification head, if it has one, and check its logits."""
    import torch

    try:
        classifier, model_config = load_classifier(reference.folder, reference.name)
    except ModelLoadError as exc:
        log.info("no classification head exported: %s", exc)
        return None

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, pixel_values):
            return self.classifier(pixel_values=pixel_values).logits

    module = Logits().eval()
    _torch_export(module, path, pixels[:2], "logits", opset)
    session, _ = _open_session(path, "cpu")
    run = session_runner(session, "logits")
    with torch.inference_mode():
        expected = run_batches(lambda b: module(torch.from_numpy(b)).numpy(), pixels, batch_size)
    got = run_batches(run, pixels, batch_size)
    cosine = np.sum(_unit(got) * _unit(expected), axis=1)
    if cosine.min() < config.ONNX_MIN_COSINE:
        raise ModelExportError(
            f"the ONNX classifier's logits differ from PyTorch's (lowest cosine "
            f"{cosine.min():.6f}, need >= {config.ONNX_MIN_COSINE})"
        )
    return {
        "id2label": {str(k): v for k, v in model_config.id2label.items()},
        "min_cosine": round(float(cosine.min()), 7),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _torch_export(module, path: Path, sample: np.ndarray, output_name: str, opset: int) -> None:
    """Trace `module` to ONNX at `path`, with a free batch axis.

    The TorchScript exporter (dynamo=False), not the newer dynamo one: it needs no onnxscript,
    exports a ViT in a fraction of the time, and names each node after its module
    (`/encoder/layer.3/attention/q_proj/MatMul`), which is how onnx_int8.INT8_SCOPES pick
    layers.
    """
    import torch

    # torch before 2.5 has only the TorchScript exporter, and no `dynamo` argument.
    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    legacy: dict[str, Any] = {"dynamo": False} if has_dynamo else {}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # Tracer notices about Python conditions fixed at trace time: the image size is
            # fixed by the preprocessing, and validation checks the result.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(np.ascontiguousarray(sample)),),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=opset,
                **legacy,
            )
    except Exception as exc:
        text = first_line(exc)
        raise ModelExportError(f"torch cannot export this model to opset {opset}: {text}") from None
