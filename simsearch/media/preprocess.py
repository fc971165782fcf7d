"""Turning a decoded RGB image into model input as transformers' image processors do
(resize, centre crop, rescale, normalise), and embedding images in batches."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from simsearch.config import DRAFT_OVERSAMPLE, MAX_RESIZED_BYTES
from simsearch.errors import ImageError


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's image-processor settings, applied with Pillow and numpy.

    Follows transformers' image processors: resize (to an exact size, or the shortest edge
    to `size`), optional centre crop, rescale to [0, 1], normalise by mean and std.
    """

    resize: str  # "exact" (to height x width) or "shortest_edge"
    size: tuple[int, ...]  # (height, width) for exact, (edge,) for shortest_edge
    resample: int  # a PIL.Image.Resampling value, as the configs store it
    crop: tuple[int, int] | None  # (height, width) of the centre crop, or None
    rescale_factor: float | None  # None: no rescaling
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, proc) -> Preprocessing:
        """Read the settings of a transformers image processor."""
        size = dict(getattr(proc, "size", None) or {})
        dims: tuple[int, ...]
        if not getattr(proc, "do_resize", True):
            resize, dims = "none", ()
        elif "height" in size and "width" in size:
            resize, dims = "exact", (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            resize, dims = "shortest_edge", (int(size["shortest_edge"]),)
        else:
            raise ImageError(f"unsupported image processor size setting: {size}")
        crop = None
        if getattr(proc, "do_center_crop", False):
            cs = dict(getattr(proc, "crop_size", None) or {})
            crop = (int(cs["height"]), int(cs["width"]))
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None
        mean = std = None
        if getattr(proc, "do_normalize", True):
            mean = tuple(float(x) for x in proc.image_mean)
            std = tuple(float(x) for x in proc.image_std)
        resample = getattr(proc, "resample", Image.Resampling.BILINEAR)
        return cls(resize, dims, int(resample), crop, rescale, mean, std)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Rebuild the settings that `to_dict` wrote (as a manifest stores them)."""
        return cls(
            resize=d["resize"],
            size=tuple(d["size"]),
            resample=int(d["resample"]),
            crop=None if d["crop"] is None else tuple(d["crop"]),
            rescale_factor=d["rescale_factor"],
            mean=None if d["mean"] is None else tuple(d["mean"]),
            std=None if d["std"] is None else tuple(d["std"]),
        )

    def to_dict(self) -> dict:
        """Return a JSON-friendly dict (lists, not tuples) for the manifest."""
        return json_ready(asdict(self))

    def input_side(self) -> int | None:
        """The side of the square the model sees (the crop, or an exact square resize), or
        None when its input is not one fixed square."""
        if self.crop is not None and self.crop[0] == self.crop[1]:
            return int(self.crop[0])
        if self.crop is None and self.resize == "exact" and self.size[0] == self.size[1]:
            return int(self.size[0])
        return None

    def scaled_to(self, side: int) -> Preprocessing:
        """The same preprocessing for a model that sees `side` x `side` px: every size scaled
        by side / input_side() (a shortest edge of 256 before a 224 crop becomes 128 before
        a 112 crop), the filter, rescale and normalisation unchanged. ValueError when the
        input is not one fixed square."""
        own = self.input_side()
        if own is None or self.resize == "none":
            raise ValueError("the model's input is not a resized square, so it cannot be scaled")
        size = (side, side) if self.resize == "exact" else (round(self.size[0] * side / own),)
        crop = None if self.crop is None else (side, side)
        return replace(self, size=size, crop=crop)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) the image will have after resizing, before cropping."""
        if self.resize == "exact":
            return self.size[1], self.size[0]
        if self.resize == "shortest_edge":
            edge = self.size[0]
            if width <= height:
                return edge, int(edge * height / width)
            return int(edge * width / height), edge
        return width, height

    def check_resize(self, width: int, height: int) -> None:
        """Raise ImageError when resizing a width x height image for the model would take
        more than MAX_RESIZED_BYTES (a shortest-edge resize of a very thin image)."""
        new_w, new_h = self.output_size(width, height)
        cost = 16 * new_w * new_h  # 8-bit RGB as Pillow stores it, and its float32 copy
        if cost > MAX_RESIZED_BYTES:
            raise ImageError(
                f"image is {width}x{height}: too thin for this model's resize to "
                f"{new_w}x{new_h} (aspect ratio above {self._max_aspect():,.0f}:1)"
            )

    def _max_aspect(self) -> float:
        edge = self.size[0] if self.size else 1
        return MAX_RESIZED_BYTES / 16 / max(1, edge * edge)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the smallest (width, height) a JPEG may be decoded at for this preprocessing.

        DRAFT_OVERSAMPLE times the resize target. A shortest-edge target does not depend on
        orientation; a non-square exact target might, after the EXIF rotation that follows
        decoding, so its larger side is asked for both ways.
        """
        target_w, target_h = self.output_size(width, height)
        if self.resize == "exact" and target_w != target_h:
            target_w = target_h = max(target_w, target_h)
        return DRAFT_OVERSAMPLE * target_w, DRAFT_OVERSAMPLE * target_h

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Return the model input for an RGB image: float32, channels first (3, H, W)."""
        self.check_resize(*img.size)
        new_w, new_h = self.output_size(*img.size)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.uint8)
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        out = arr.astype(np.float32)
        if self.rescale_factor is not None:
            out *= np.float32(self.rescale_factor)
        if self.mean is not None:
            out -= np.asarray(self.mean, dtype=np.float32)
            out /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre-crop an (H, W, C) array as transformers does, zero-padding when it is smaller."""
    h, w = arr.shape[:2]
    if h < crop_h or w < crop_w:
        padded = np.zeros((max(h, crop_h), max(w, crop_w), arr.shape[2]), dtype=arr.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return arr[top : top + crop_h, left : left + crop_w]


def json_ready(value):
    """Return `value` with tuples turned into lists, so it equals its own JSON round trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def embed_in_batches(embedder, images) -> np.ndarray:
    """Return `embedder`'s unit-norm float32 row for each RGB PIL image, preprocessed and
    embedded `embedder.batch_size` at a time (any object with `preprocess`, `embed_pixels`,
    `batch_size` and `dim`: the torch and the ONNX Runtime embedders)."""
    out = [np.empty((0, embedder.dim), dtype=np.float32)]
    for start in range(0, len(images), embedder.batch_size):
        chunk = images[start : start + embedder.batch_size]
        out.append(embedder.embed_pixels(np.stack([embedder.preprocess(img) for img in chunk])))
    return np.concatenate(out)
