"""The ONNX Runtime backend: embedding with a folder that `simsearch export-model` wrote.

This module imports numpy and onnxruntime only, never torch or transformers, so that an index
can be filled and searched on a machine that has neither (`pip install 'simsearch[onnx]'`).
The layer, pooling and L2 normalisation are baked into the exported graph; what is left here
is the preprocessing (the checkpoint's, recorded in the export) and running the session.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from simsearch.config import DEFAULT_BATCH_SIZE
from simsearch.errors import ModelLoadError, first_line
from simsearch.fs.files import sha256_of
from simsearch.media.preprocess import embed_in_batches
from simsearch.models.student import input_preprocessing
from simsearch.storage.manifest import Manifest

log = logging.getLogger(__name__)

# Version of simsearch_onnx.json; bumped on an incompatible change, so an older simsearch
# refuses a newer export instead of misreading it.
ONNX_EXPORT_FORMAT = 1

# What `export-model` writes into its output folder.
ONNX_MODEL_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_CLASSIFIER_FILE = "classifier.onnx"
ONNX_INFO_FILE = "simsearch_onnx.json"

# What the backend can run: the fp32 export, or the int8 one that `--int8` adds.
ONNX_PRECISIONS = ("fp32", "int8")

# The graph's input and output names (onnx_export writes them).
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embedding"

# onnxruntime's log level for our sessions: 3 = errors only. Its warnings (about unused
# initialisers, or a provider it skips) are for the people who build graphs, not for users.
ORT_LOG_ERRORS_ONLY = 3

INSTALL_HINT = "pip install 'simsearch[onnx]'"


def import_onnxruntime():
    """Return the onnxruntime module, or raise a ModelLoadError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError(f"the ONNX backend needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def read_export_info(folder: str | os.PathLike) -> dict:
    """Return the contents of an export's simsearch_onnx.json, or raise ModelLoadError."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"ONNX model folder not found: {folder}")
    info_file = folder / ONNX_INFO_FILE
    if not info_file.is_file():
        raise ModelLoadError(
            f"{folder} is not a simsearch ONNX export (it has no {ONNX_INFO_FILE})",
            path=folder,
            fix="export-onnx",
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {info_file}: {exc}") from None
    version = info.get("format") if isinstance(info, dict) else None
    if not isinstance(version, int) or version > ONNX_EXPORT_FORMAT:
        raise ModelLoadError(
            f"{info_file} has export format {version!r}; this simsearch reads versions up to "
            f"{ONNX_EXPORT_FORMAT}: upgrade simsearch, or export the model again"
        )
    return info


def source_manifest(info: dict, model: str, precision: str) -> Manifest:
    """Return the manifest of vectors made with an export: its source model's, with `model`
    as the model (the export's folder, or the source model a cached export was made from:
    what the index finds it by again) and an onnx precision."""
    src = info["source"]
    return Manifest(
        model=model,
        weights_sha256=src["weights_sha256"],
        revision=src.get("revision"),
        architecture=src["architecture"],
        layer=int(src["layer"]),
        num_layers=int(src["num_layers"]),
        pool=src["pool"],
        dim=int(src["dim"]),
        preprocessing=src["preprocessing"],
        precision=f"onnx-{precision}",
        config_sha256=src.get("config_sha256"),
        student=info.get("student") if isinstance(info.get("student"), dict) else None,
    )


class OnnxEmbedder:
    """Embeds images with an exported model in ONNX Runtime: the Embedder's interface.

    `folder` is what `simsearch export-model` wrote. `precision` "fp32" runs model.onnx;
    "int8" runs model.int8.onnx (an export made with int8=True); "auto" (or None) is fp32,
    as the PyTorch backend's auto never picks int8.
    `device` "auto" uses onnxruntime's CUDA provider when it has one, else the CPU.
    `model_id`: what the manifest names as the model, when not `folder` (a cached export
    names the model it was made from: models/onnx_cache.py).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        precision: str | None = None,
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        model_id: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        precision = precision or "auto"
        if precision == "auto":
            precision = "fp32"
        if precision not in ONNX_PRECISIONS:
            raise ModelLoadError(
                f"the ONNX backend runs fp32 or int8 (an export with int8), not precision "
                f"{precision}",
                param="precision",
            )
        self.folder = Path(folder).expanduser().resolve()
        self.name = self.model_id = model_id or str(self.folder)
        info = read_export_info(self.folder)
        self.info = info
        self.precision = precision
        self.batch_size = batch_size
        self._manifest = source_manifest(info, self.model_id, precision)
        self.layer, self.pool = self._manifest.layer, self._manifest.pool
        self.num_layers, self.dim = self._manifest.num_layers, self._manifest.dim
        # A student's export takes the student's input (smaller images, perhaps).
        self.preprocess = input_preprocessing(self._manifest.preprocessing, self._manifest.student)
        self.input_shape = tuple(info["input"]["shape"][1:])  # (3, H, W); the batch is free

        path = self.folder / (ONNX_INT8_FILE if precision == "int8" else ONNX_MODEL_FILE)
        recorded = info.get("files", {}).get(path.name)
        if recorded is None or not path.is_file():
            hint = " (export the model with int8)" if precision == "int8" else ""
            raise ModelLoadError(f"{self.folder} has no {path.name}{hint}", path=self.folder)
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise ModelLoadError(
                f"{path} is {size:,} bytes, but the export wrote {recorded['bytes']:,}: it is "
                "incomplete or was replaced; copy or export the model again"
            )
        # The same size is not the same model: another export of the same architecture has
        # it too. Its vectors would be mixed into the index as this model's.
        if recorded.get("sha256") and sha256_of(path) != recorded["sha256"]:
            raise ModelLoadError(
                f"{path} is not the file the export wrote (its SHA-256 differs from the one "
                f"recorded in {ONNX_INFO_FILE}): it was replaced or changed; copy or export "
                "the model again"
            )
        self.session, self.device = _open_session(path, device)

    def manifest(self) -> Manifest:
        """Return the manifest an index built with this embedder records."""
        return self._manifest

    @property
    def weights_sha256(self) -> str:
        """The SHA-256 of the source model's weights: the export is the same model."""
        return self._manifest.weights_sha256

    def embed_images(self, images) -> np.ndarray:
        """Return one unit-norm float32 row per RGB PIL image, computed in batches."""
        return embed_in_batches(self, images)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Return unit-norm float32 vectors, shape (B, dim), for preprocessed (B, 3, H, W) input."""
        if len(pixels) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if tuple(pixels.shape[1:]) != self.input_shape:
            # The export fixed the image size (position embeddings are baked in for it);
            # onnxruntime's own message about a shape mismatch names no cause.
            raise ModelLoadError(
                f"the ONNX model takes {self.input_shape} images, not {tuple(pixels.shape[1:])}"
            )
        batch = np.ascontiguousarray(pixels, dtype=np.float32)
        (vectors,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _open_session(path: Path, device: str):
    """Return (an onnxruntime session for the model at `path`, "cuda" or "cpu")."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; choose one of auto, cpu, cuda")
    if device == "cuda" and not has_cuda:
        raise ModelLoadError(
            "device cuda was asked for, but this onnxruntime has no CUDA provider "
            "(pip install onnxruntime-gpu)",
            param="device",
        )
    use_cuda = has_cuda and device != "cpu"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else []
    providers = providers or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_ERRORS_ONLY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin between operators by default, taking CPU from the threads
    # that decode the next batch: without spinning, indexing DINOv2-S on 2 cores ran 3-13 %
    # faster (ONNX fp32 5.4 -> 5.7 img/s, int8 10.4 -> 11.4, benchmarks/onnx_speed.py photos).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        text = first_line(exc)
        raise ModelLoadError(f"onnxruntime cannot load {path}: {text}") from None
    used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    log.debug("onnxruntime %s on %s (%s)", path.name, used, ", ".join(session.get_providers()))
    return session, used
