"""Exporting a model's embedding path (and classification head) to ONNX, optionally int8,
and proving on real photographs that the export computes what PyTorch computes.

The exported folder is what `OnnxEmbedder` (onnx_backend.py) runs without torch. It is built
in a temporary folder beside the output and renamed into place only once validation passed,
so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_OPSET,
    INT8_MIN_COSINE,
    INT8_MIN_RECALL,
    MIN_OPSET,
    ONNX_CLASSIFIER_FILE,
    ONNX_INFO_FILE,
    ONNX_INT8_FILE,
    ONNX_MIN_COSINE,
    ONNX_MODEL_FILE,
    SAMPLE_PHOTOS,
    VALIDATION_MAX_IMAGES,
    VALIDATION_MIN_IMAGES,
)
from simsearch.errors import ImageError, ModelExportError, ModelLoadError, first_line
from simsearch.fs.files import sha256_of
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.discover import find_images
from simsearch.models.onnx import (
    INPUT_NAME,
    ONNX_EXPORT_FORMAT,
    OUTPUT_NAME,
    _open_session,
    import_onnxruntime,
)
from simsearch.records import OnnxExport

log = logging.getLogger(__name__)

EXPORT_HINT = "pip install 'simsearch[onnx-export]'"

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


def export_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layer: int = -1,
    pool: str = "cls",
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    validate_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress=None,
) -> OnnxExport:
    """Export `model`'s embedding path (and head, when it has one) to the new folder `output`.

    The graph takes `pixel_values` (batch, 3, H, W), float32, preprocessed as the checkpoint
    says, and gives `embedding` (batch, dim): the hidden state of `layer`, pooled by `pool`,
    L2-normalised, exactly as `Embedder` computes it. With `int8`, model.int8.onnx is added
    (onnxruntime dynamic quantisation, int8 weights). Each file is checked against PyTorch on
    `validate_dir`'s images, or on scikit-image's sample photographs; a file that misses the
    bounds in config.py raises ModelExportError and nothing is written. `progress`, if given, is
    a tqdm-like bar advanced per image embedded.
    """
    start = time.perf_counter()
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ModelExportError(f"{output} already exists and is not empty; choose a new --output")
    if opset < MIN_OPSET:
        raise ModelExportError(
            f"--opset {opset} is too old: the attention needs opset {MIN_OPSET} or later"
        )
    import_onnxruntime()
    try:
        import onnx  # noqa: F401  (torch's exporter and the int8 quantiser need it)
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModelExportError(f"exporting needs {exc.name}: {EXPORT_HINT}") from None

    from simsearch.models.embed import Embedder

    reference = Embedder(
        model, layer=layer, pool=pool, device="cpu", precision="fp32", batch_size=batch_size
    )
    images, source = _validation_images(validate_dir)
    pixels = _pixels(images, reference.preprocess)
    if progress is not None:
        progress.total = len(pixels) * (3 if int8 else 2)
        progress.refresh()
    expected = _embed(reference.embed_pixels, pixels, batch_size, progress)

    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        files: dict[str, dict] = {}
        _export_embedding(reference, work / ONNX_MODEL_FILE, pixels[:2], opset)
        session, _ = _open_session(work / ONNX_MODEL_FILE, "cpu")
        got = _embed(_runner(session, OUTPUT_NAME), pixels, batch_size, progress)
        cosine = np.sum(got * expected, axis=1)
        if cosine.min() < ONNX_MIN_COSINE:
            raise ModelExportError(
                f"the ONNX model's vectors differ from PyTorch's (lowest cosine "
                f"{cosine.min():.6f} on {source}, need >= {ONNX_MIN_COSINE}); this model's "
                "architecture does not export faithfully, try another --opset"
            )
        files[ONNX_MODEL_FILE] = _file_entry(work / ONNX_MODEL_FILE, output=OUTPUT_NAME)

        int8_figures = {}
        if int8:
            int8_figures = _quantise(work, expected, pixels, batch_size, source, progress)
            files[ONNX_INT8_FILE] = _file_entry(
                work / ONNX_INT8_FILE, output=OUTPUT_NAME, quantised=int8_figures["int8_scope"]
            )

        head = _export_classifier(reference, work / ONNX_CLASSIFIER_FILE, pixels, opset, batch_size)
        if head is not None:
            files[ONNX_CLASSIFIER_FILE] = _file_entry(work / ONNX_CLASSIFIER_FILE, output="logits")

        result = OnnxExport(
            output=str(output),
            model=reference.model_id,
            layer=reference.layer,
            num_layers=reference.num_layers,
            pool=reference.pool,
            dim=reference.dim,
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
            raise ModelExportError(f"cannot move the export to {output}: {exc.strerror}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _replace_seconds(result, time.perf_counter() - start)


# -- what is exported ------------------------------------------------------------------------


def _embedding_module(reference):
    """Return a torch module computing `reference`'s vectors in one traceable forward.

    The Embedder stops its forward pass with a hook that raises, which cannot be traced; this
    asks a fresh copy of the backbone for all hidden states instead and keeps the wanted one
    (the exporter drops the blocks after it, which no output depends on).
    """
    import torch

    from simsearch.models.hub import FINAL_NORM_NAMES, load_backbone

    backbone, _ = load_backbone(reference.folder)
    final_norm = None
    if reference.final_norm is not None:
        final_norm = next(getattr(backbone, n) for n in FINAL_NORM_NAMES if hasattr(backbone, n))

    class EmbeddingPath(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.final_norm = final_norm

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
            return torch.nn.functional.normalize(vectors, dim=-1)

    return EmbeddingPath().eval()


def _export_embedding(reference, path: Path, sample: np.ndarray, opset: int) -> None:
    if reference.pool == "cls":
        reference.embed_pixels(sample)  # raises LayerError for a model with no [CLS] token
    _torch_export(_embedding_module(reference), path, sample, OUTPUT_NAME, opset)


def _export_classifier(
    reference, path: Path, pixels: np.ndarray, opset: int, batch_size: int
) -> dict | None:
    """Export the checkpoint's classification head, if it has one, and check its logits."""
    import torch

    from simsearch.models.hub import load_classifier

    try:
        classifier, config = load_classifier(reference.folder, reference.name)
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
    run = _runner(session, "logits")
    with torch.inference_mode():
        expected = _embed(lambda b: module(torch.from_numpy(b)).numpy(), pixels, batch_size)
    got = _embed(run, pixels, batch_size)
    cosine = np.sum(_unit(got) * _unit(expected), axis=1)
    if cosine.min() < ONNX_MIN_COSINE:
        raise ModelExportError(
            f"the ONNX classifier's logits differ from PyTorch's (lowest cosine "
            f"{cosine.min():.6f}, need >= {ONNX_MIN_COSINE})"
        )
    return {
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "min_cosine": round(float(cosine.min()), 7),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
    }


def _torch_export(module, path: Path, sample: np.ndarray, output_name: str, opset: int) -> None:
    """Trace `module` to ONNX at `path`, with a free batch axis.

    The TorchScript exporter (dynamo=False), not the newer dynamo one: it needs no onnxscript,
    exports a ViT in a fraction of the time, and names each node after its module
    (`/encoder/layer.3/attention/q_proj/MatMul`), which is how INT8_SCOPES pick layers.
    """
    import inspect

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


# -- int8 ------------------------------------------------------------------------------------


def _quantise(work: Path, expected, pixels, batch_size: int, source: str, progress) -> dict:
    """Write model.int8.onnx with the widest INT8_SCOPES scope that stays faithful, and
    return its figures; raise ModelExportError when none does."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weighted = _weight_matmuls(onnx.load(str(work / ONNX_MODEL_FILE), load_external_data=False))
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
                work / ONNX_MODEL_FILE,
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
        got = _embed(_runner(session, OUTPUT_NAME), pixels, batch_size, progress)
        del session
        cosine = np.sum(got * expected, axis=1)
        recall = recall_at_k(expected, got, 10)
        figures = {
            "int8_scope": scope,
            "int8_min_cosine": round(float(cosine.min()), 5),
            "int8_mean_cosine": round(float(cosine.mean()), 5),
            "int8_recall_at_10": round(recall, 3),
        }
        if cosine.min() >= INT8_MIN_COSINE and recall >= INT8_MIN_RECALL:
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
        f"cosine >= {INT8_MIN_COSINE} and recall@10 >= {INT8_MIN_RECALL}; "
        + "; ".join(tried or ["no linear layers to quantise"])
        + "): export without --int8"
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


def recall_at_k(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Return the share of each row's k nearest rows under `reference` that `other` keeps."""

    def neighbours(vectors):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    ref, got = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, got, strict=True)]))


# -- validation images -----------------------------------------------------------------------


def _validation_images(folder) -> tuple[list, str]:
    """Return (RGB PIL images, a description of them) to validate an export on."""
    if folder is None:
        images = sample_photos()
        return images, f"{len(images)} views of scikit-image's sample photographs"
    images = []
    for path in find_images([folder]):
        try:
            images.append(decode_image(read_image_file(path), name=path))
        except ImageError as exc:
            log.warning("skipping %s: %s", path, exc)
        if len(images) == VALIDATION_MAX_IMAGES:
            break
    if len(images) < VALIDATION_MIN_IMAGES:
        raise ModelExportError(
            f"--validate-dir {folder} has {len(images)} readable images; validation needs at "
            f"least {VALIDATION_MIN_IMAGES} (recall@10 compares each image's 10 neighbours)"
        )
    return images, f"{len(images)} images of {folder}"


def sample_photos() -> list:
    """Return 108 RGB views of scikit-image's sample photographs: each photo, mirrored,
    two corner crops, a rotated centre crop and in grey, so that every image has close
    neighbours, as in a real collection, that an unfaithful model would reorder."""
    try:
        import skimage.data
    except ImportError:
        raise ModelExportError(
            f"validation needs real photographs: pass --validate-dir DIR, or {EXPORT_HINT} "
            "(scikit-image ships sample photos)"
        ) from None
    from PIL import Image, ImageOps

    views = []
    for name in SAMPLE_PHOTOS:
        if name == "motorcycle":
            arr = skimage.data.stereo_motorcycle()[0]
        else:
            arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        views += [
            img,
            ImageOps.mirror(img),
            img.crop((0, 0, int(w * 0.7), int(h * 0.7))),
            img.crop((int(w * 0.3), int(h * 0.3), w, h)),
            img.crop((int(w * 0.15), 0, int(w * 0.85), h)).rotate(8),
            ImageOps.grayscale(img).convert("RGB"),
        ]
    return views


def _pixels(images: list, preprocess) -> np.ndarray:
    arrays = [preprocess(img) for img in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ModelExportError(
            f"this model's preprocessing gives images of several sizes ({sorted(shapes)[:2]}); "
            "an ONNX export needs one input size: a crop_size or an exact height and width "
            "in preprocessor_config.json"
        )
    return np.stack(arrays)


# -- helpers ---------------------------------------------------------------------------------


def _runner(session, output_name: str):
    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([output_name], {INPUT_NAME: np.ascontiguousarray(batch)})[0]

    return run


def _embed(run, pixels: np.ndarray, batch_size: int, progress=None) -> np.ndarray:
    out = []
    for start in range(0, len(pixels), batch_size):
        out.append(np.asarray(run(pixels[start : start + batch_size]), dtype=np.float32))
        if progress is not None:
            progress.update(len(out[-1]))
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _file_entry(path: Path, **extra) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path), **extra}


def _export_info(reference, result: OnnxExport, files: dict, head: dict | None) -> dict:
    """Return simsearch_onnx.json: what the export is, made from what, and how it checked."""
    from dataclasses import asdict

    import onnxruntime
    import torch

    from simsearch._version import __version__

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
    from dataclasses import replace

    return replace(result, seconds=round(seconds, 1))
