"""The photographs an ONNX export is checked on, and how its outputs are compared with
PyTorch's: running a graph (or a torch module) over them in batches, and recall@k.

The bounds a check must meet are in config.py (ONNX_MIN_COSINE, INT8_MIN_COSINE,
INT8_MIN_RECALL); the checks themselves are where each file is made: onnx_export (the fp32
embedding), onnx_graph (the classifier's logits), onnx_int8 (each int8 scope).
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageOps

from simsearch.config import VALIDATION_MAX_IMAGES, VALIDATION_MIN_IMAGES
from simsearch.errors import ImageError, ModelExportError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.discover import find_images
from simsearch.models.onnx import INPUT_NAME
from simsearch.progress import Progress, advance

log = logging.getLogger(__name__)

EXPORT_HINT = "pip install 'simsearch[onnx-export]'"

# scikit-image's sample photographs (shipped inside the package, no download): people,
# animals, objects, space, microscopy, text and textures, so validation (export-model) and
# the benchmarks (copy_retrieval) see the range of inputs a collection holds.
SAMPLE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "coins",
    "immunohistochemistry",
    "moon",
    "brick",
    "grass",
    "gravel",
    "horse",
    "page",
    "text",
    "clock",
    "motorcycle",
)


def validation_images(folder) -> tuple[list, str]:
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
            f"{folder} has {len(images)} readable images; validation needs at "
            f"least {VALIDATION_MIN_IMAGES} (recall@10 compares each image's 10 neighbours)",
            param="validate_dir",
            path=folder,
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
            f"validation needs real photographs: give a folder of them, or {EXPORT_HINT} "
            "(scikit-image ships sample photos)",
            param="validate_dir",
        ) from None
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


def stack_pixels(images: list, preprocess) -> np.ndarray:
    """Return the images preprocessed for the model, as one (n, 3, H, W) array."""
    arrays = [preprocess(img) for img in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ModelExportError(
            f"this model's preprocessing gives images of several sizes ({sorted(shapes)[:2]}); "
            "an ONNX export needs one input size: a crop_size or an exact height and width "
            "in preprocessor_config.json"
        )
    return np.stack(arrays)


def session_runner(session, output_name: str):
    """Return a function running an ONNX Runtime `session` on a batch of pixels."""

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([output_name], {INPUT_NAME: np.ascontiguousarray(batch)})[0]

    return run


def run_batches(
    run, pixels: np.ndarray, batch_size: int, progress: Progress | None = None
) -> np.ndarray:
    """Return `run`'s outputs over `pixels`, `batch_size` images at a time, as float32."""
    out = []
    for start in range(0, len(pixels), batch_size):
        out.append(np.asarray(run(pixels[start : start + batch_size]), dtype=np.float32))
        advance(progress, len(out[-1]))
    return np.concatenate(out)


def recall_at_k(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Return the share of each row's k nearest rows under `reference` that `other` keeps."""

    def neighbours(vectors):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    ref, got = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, got, strict=True)]))
