"""Exporting a model's embedding path (and classification head) to ONNX, optionally int8,
and proving on real photographs that the export computes what PyTorch computes.

The exported folder is what `OnnxEmbedder` (onnx_backend.py) runs without torch. It is built
in a temporary folder beside the output and renamed into place only once validation passed,
so a failed or interrupted export leaves nothing behind.

`export_model` here runs the steps and writes simsearch_onnx.json; the steps live beside it:
onnx_graph (what is traced: the embedding path and the head), onnx_int8 (the quantised file)
and onnx_validation (the photographs, and comparing outputs with PyTorch's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from simsearch import config
from simsearch._version import __version__
from simsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_OPSET, MIN_OPSET
from simsearch.errors import ModelExportError
from simsearch.fs.files import sha256_of
from simsearch.models.embed import Embedder
from simsearch.models.onnx import (
    INPUT_NAME,
    ONNX_CLASSIFIER_FILE,
    ONNX_EXPORT_FORMAT,
    ONNX_INFO_FILE,
    ONNX_INT8_FILE,
    ONNX_MODEL_FILE,
    OUTPUT_NAME,
    _open_session,
    import_onnxruntime,
)
from simsearch.models.onnx_graph import export_classifier, export_embedding
from simsearch.models.onnx_int8 import quantise_int8
from simsearch.models.onnx_validation import (
    EXPORT_HINT,
    recall_at_k,
    run_batches,
    sample_photos,
    session_runner,
    stack_pixels,
    validation_images,
)
from simsearch.progress import Progress, set_total
from simsearch.records import OnnxExport

__all__ = ["export_model", "recall_at_k", "sample_photos"]

log = logging.getLogger(__name__)


def export_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layer: int = -1,
    pool: str | None = None,
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    validate_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> OnnxExport:
    """Export `model`'s embedding path (and head, when it has one) to the new folder `output`.

    The graph takes `pixel_values` (batch, 3, H, W), float32, preprocessed as the checkpoint
    says, and gives `embedding` (batch, dim): the hidden state of `layer`, pooled by `pool`,
    L2-normalised, exactly as `Embedder` computes it (`pool` None: cls; a student's export
    computes its teacher's space, its projection included). With `int8`, model.int8.onnx is added
    (onnxruntime dynamic quantisation, int8 weights, of the model SmoothQuant-scaled by its
    activations on the validation images). Each file is checked against PyTorch on
    `validate_dir`'s images, or on scikit-image's sample photographs; a file that misses the
    bounds in config.py raises ModelExportError and nothing is written. `progress`, if given, is
    a tqdm-like bar advanced per image embedded.
    """
    start = time.perf_counter()
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ModelExportError(
            f"{output} already exists and is not empty; choose a new output folder",
            param="output",
            path=output,
        )
    if opset < MIN_OPSET:
        raise ModelExportError(
            f"opset {opset} is too old: the attention needs opset {MIN_OPSET} or later",
            param="opset",
        )
    import_onnxruntime()
    try:
        import onnx  # noqa: F401  (torch's exporter and the int8 quantiser need it)
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModelExportError(f"exporting needs {exc.name}: {EXPORT_HINT}") from None

    reference = Embedder(
        model, layer=layer, pool=pool, device="cpu", precision="fp32", batch_size=batch_size
    )
    images, source = validation_images(validate_dir)
    pixels = stack_pixels(images, reference.preprocess)
    set_total(progress, len(pixels) * (4 if int8 else 2))
    expected = run_batches(reference.embed_pixels, pixels, batch_size, progress)

    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        files: dict[str, dict] = {}
        export_embedding(reference, work / ONNX_MODEL_FILE, pixels[:2], opset)
        session, _ = _open_session(work / ONNX_MODEL_FILE, "cpu")
        got = run_batches(session_runner(session, OUTPUT_NAME), pixels, batch_size, progress)
        cosine = np.sum(got * expected, axis=1)
        if cosine.min() < config.ONNX_MIN_COSINE:
            raise ModelExportError(
                f"the ONNX model's vectors differ from PyTorch's (lowest cosine "
                f"{cosine.min():.6f} on {source}, need >= {config.ONNX_MIN_COSINE}); this model's "
                "architecture does not export faithfully, try another opset",
                param="opset",
            )
        files[ONNX_MODEL_FILE] = _file_entry(work / ONNX_MODEL_FILE, output=OUTPUT_NAME)

        int8_figures = {}
        if int8:
            int8_figures = quantise_int8(
                work, reference, expected, pixels, opset, batch_size, source, progress
            )
            files[ONNX_INT8_FILE] = _file_entry(
                work / ONNX_INT8_FILE, output=OUTPUT_NAME, quantised=int8_figures["int8_scope"]
            )

        head = export_classifier(reference, work / ONNX_CLASSIFIER_FILE, pixels, opset, batch_size)
        if head is not None:
            files[ONNX_CLASSIFIER_FILE] = _file_entry(work / ONNX_CLASSIFIER_FILE, output="logits")

        space = reference.manifest()  # a student's: its teacher's layer, pooling and dim
        result = OnnxExport(
            output=str(output),
            model=reference.model_id,
            layer=space.layer,
            num_layers=space.num_layers,
            pool=space.pool,
            dim=space.dim,
            opset=opset,
            input_size=list(pixels.shape[2:]),
            validated_on=source,
            images=len(pixels),
            fp32_min_cosine=round(float(cosine.min()), 7),
            fp32_mean_cosine=round(float(cosine.mean()), 7),
            fp32_mb=round(files[ONNX_MODEL_FILE]["bytes"] / 1e6, 1),
            int8_mb=(
                round(files[ONNX_INT8_FILE]["bytes"] / 1e6, 1) if ONNX_INT8_FILE in files else None
            ),
            classes=None if head is None else len(head["id2label"]),
            classifier_min_cosine=None if head is None else head["min_cosine"],
            classifier_top1_agreement=None if head is None else head["top1_agreement"],
            seconds=0.0,
            **int8_figures,
        )
        info = _export_info(reference, result, files, head)
        (work / ONNX_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _fsync_folder(work)
        try:
            os.replace(work, output)  # an empty folder there is replaced; a full one refuses
        except OSError as exc:
            raise ModelExportError(
                f"cannot move the export to {output}: {exc.strerror}", param="output", path=output
            ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _replace_seconds(result, time.perf_counter() - start)


def _file_entry(path: Path, **extra) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path), **extra}


def _export_info(reference, result: OnnxExport, files: dict, head: dict | None) -> dict:
    """Return simsearch_onnx.json: what the export is, made from what, and how it checked."""
    import onnxruntime
    import torch

    manifest = reference.manifest()
    keys = (
        "model",
        "weights_sha256",
        "config_sha256",
        "revision",
        "architecture",
        "layer",
        "num_layers",
    )
    source = {k: getattr(manifest, k) for k in keys}
    source.update(pool=manifest.pool, dim=manifest.dim, preprocessing=manifest.preprocessing)
    validation = {k: v for k, v in asdict(result).items() if k not in ("output", "seconds")}
    return {
        "format": ONNX_EXPORT_FORMAT,
        # A student's export: `source` is the teacher's space, `student` the model exported.
        **({"student": manifest.student} if manifest.student else {}),
        "source": source,
        "input": {"name": INPUT_NAME, "shape": [None, 3, *result.input_size]},
        "opset": result.opset,
        "files": files,
        "id2label": None if head is None else head["id2label"],
        "validation": validation,
        "made_with": {
            "simsearch": __version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _fsync_folder(folder: Path) -> None:
    """Flush the export's files to disk before the rename makes them the output."""
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_seconds(result: OnnxExport, seconds: float) -> OnnxExport:

    return replace(result, seconds=round(seconds, 1))
