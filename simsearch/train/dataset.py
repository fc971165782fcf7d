"""Labelled image folders for fine-tuning: one sub-folder per class, a stratified validation
split, decoded images kept in memory, and the light augmentation that training sees.

Images go through the same safe reading and decoding as indexing (`read_image_file`,
`decode_image`); a file that cannot be read is left out with one warning, never a crash.
Everything random here is a function of (seed, epoch, image), so a resumed run sees the
same batches and the same crops as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.config import DEFAULT_WORKERS, MAX_IMAGE_PIXELS
from simsearch.errors import FinetuneError, ImageError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.discover import find_images
from simsearch.media.prefetch import read_ahead
from simsearch.media.preprocess import Preprocessing
from simsearch.progress import Progress, advance, set_total

log = logging.getLogger(__name__)

# Decoded images are kept with their shortest edge at this many times the model's input
# size: a random crop of half the area still has ~1.4x the pixels it is resized to, and a
# 12-megapixel photo costs ~0.6 MB instead of 36 MB.
CACHE_EDGE_FACTOR = 2

# Decoded images are kept in memory up to this many bytes (~3,500 images at 224 px: a few
# hundred per class for ten classes); the rest are read and decoded again each time they
# are used, which costs a few milliseconds an image, small beside a training step.
CACHE_MAX_BYTES = 2 << 30

# Random resized crop: the share of the image's area kept, and the aspect ratios tried.
# torchvision's default area range (0.08, 1) is for training from scratch; a model that
# already sees well is fine-tuned on crops that keep most of the subject.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# A mirrored photo shows the same class for nearly everything people sort (not for text).
FLIP_PROBABILITY = 0.5

# Attempts at drawing a crop that fits before falling back to the whole image (torchvision
# tries 10 as well).
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class Example:
    """One labelled image: its file and its class id (the index in the sorted class names)."""

    path: Path
    label: int


def list_classes(folder: Path) -> list[str]:
    """Return the class names of a data folder: its sub-folders, sorted by name."""
    if not folder.is_dir():
        raise FinetuneError(f"data folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_examples(
    folder: Path, classes: list[str], present: list[str] | None = None
) -> list[Example]:
    """Return the image files under folder/<class>/ (recursively), class by class.

    `present` names the classes to look for (default: all of them); labels are always
    positions in `classes`. A class folder with no image files is an error: it would be a
    class the model cannot learn, and is more likely a mistake (a wrong folder) than a wish.
    """
    examples = []
    for name in classes if present is None else present:
        found = [Example(path, classes.index(name)) for path in find_images([folder / name])]
        if not found:
            raise FinetuneError(
                f"class folder {folder / name} holds no images (*.jpg, *.png, ...); "
                "remove it or add images"
            )
        examples += found
    return examples


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Return (train, val): `fraction` of each class, at least one image, drawn for validation.

    Stratified, so every class is measured; seeded, so a resumed run splits the same way.
    """
    by_class: dict[int, list[Example]] = {}
    for example in examples:
        by_class.setdefault(example.label, []).append(example)
    train, val = [], []
    for label, members in sorted(by_class.items()):
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return train, val


def input_size(preprocess: Preprocessing) -> tuple[int, int]:
    """Return the (height, width) of the model input that `preprocess` makes."""
    if preprocess.crop is not None:
        return preprocess.crop
    if preprocess.resize == "exact":
        return preprocess.size[0], preprocess.size[1]
    if preprocess.resize == "shortest_edge":
        return preprocess.size[0], preprocess.size[0]
    raise FinetuneError(
        "the model's image processor does not resize images (do_resize is false); "
        "fine-tuning needs a fixed input size"
    )


class TrainingData:
    """The decoded training and validation images of a data folder, and their batches."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        preprocess: Preprocessing,
        *,
        val_dir: str | os.PathLike | None = None,
        val_split: float = 0.2,
        seed: int = 0,
        workers: int = DEFAULT_WORKERS,
        progress: Progress | None = None,
    ) -> None:
        data_dir = Path(data_dir)
        self.classes = list_classes(data_dir)
        if len(self.classes) < 2:
            raise FinetuneError(
                f"{data_dir} has {len(self.classes)} class folder(s); fine-tuning needs at "
                "least 2: one sub-folder of images per class (DATA_DIR/cats/, DATA_DIR/dogs/)"
            )
        train = find_examples(data_dir, self.classes)
        val: list[Example] = []
        if val_dir is not None:
            val_classes = list_classes(Path(val_dir))
            unknown = sorted(set(val_classes) - set(self.classes))
            if unknown:
                raise FinetuneError(
                    f"validation folder {val_dir} has classes the training folder lacks: "
                    f"{', '.join(unknown)}"
                )
            present = [c for c in self.classes if c in val_classes]
            val = find_examples(Path(val_dir), self.classes, present)

        self.height, self.width = input_size(preprocess)
        # Validation sees what indexing sees: the checkpoint's own resize and crop (made
        # square when the processor keeps aspect ratios, so that images stack in a batch).
        self.eval_preprocess = preprocess
        if preprocess.crop is None and preprocess.resize != "exact":
            self.eval_preprocess = replace(preprocess, resize="exact", size=(self.height,) * 2)
        # Training crops are resized straight to the input size; only scaling remains.
        self.normalise = replace(preprocess, resize="none", size=(), crop=None)
        self.resample = Image.Resampling(preprocess.resample)

        self._cache: dict[Path, Image.Image] = {}
        everything = train + val
        readable = self._decode_all(everything, preprocess, workers, progress)
        self.skipped = len(everything) - len(readable)
        train = [e for e in train if e.path in readable]
        val = [e for e in val if e.path in readable]
        if val_dir is None:
            self._check_counts(train, 2, "(one to train on, one to validate)")
            train, val = split_examples(train, val_split, seed)
        else:
            self._check_counts(train, 1, "to train on")
            if not val:
                raise FinetuneError(f"validation folder {val_dir} holds no readable images")
        self.train, self.val = train, val
        self.fingerprint = self._fingerprint(data_dir, val_dir)

    def _check_counts(self, examples: list[Example], least: int, why: str) -> None:
        counts = np.bincount([e.label for e in examples], minlength=len(self.classes))
        for name, count in zip(self.classes, counts, strict=True):
            if count < least:
                raise FinetuneError(
                    f"class {name!r} has {count} readable image(s); it needs at least {least} {why}"
                )

    def _fingerprint(self, data_dir: Path, val_dir) -> str:
        """Return a hash of what the run trains and validates on, by path relative to the
        data folder: a resumed run must see the same images (the folder may have moved)."""

        def rel(path: Path, root) -> str:
            return os.path.relpath(path, root)

        listing = {
            "classes": self.classes,
            "train": [[rel(e.path, data_dir), e.label] for e in self.train],
            "val": [[rel(e.path, val_dir or data_dir), e.label] for e in self.val],
        }
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    # -- decoding and caching ----------------------------------------------------------

    def _decode_all(self, examples, preprocess, workers, progress) -> set[Path]:
        """Decode every image once, keep what fits in the cache; return the readable paths."""
        edge = CACHE_EDGE_FACTOR * max(self.height, self.width)
        readable, cached_bytes = set(), 0
        set_total(progress, len(examples))
        paths = [e.path for e in examples]
        # Two files a thread: each has the next while the main thread files the last away.
        ahead = 2 * max(1, workers)
        with (
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="simsearch-data") as pool,
            # Closed first, on Ctrl-C or an error: what is queued is not decoded.
            closing(read_ahead(pool, lambda p: _load(p, preprocess, edge), paths, ahead)) as ready,
        ):
            for path, (img, error) in zip(paths, ready, strict=True):
                advance(progress, 1)
                if error is not None:
                    log.warning("skipping %s: %s", path, error)
                    continue
                assert img is not None  # _load returns an image or the reason it has none
                readable.add(path)
                size = img.width * img.height * 3
                if cached_bytes + size <= CACHE_MAX_BYTES:
                    self._cache[path] = img
                    cached_bytes += size
        self._edge = edge
        self._preprocess = preprocess
        return readable

    def image(self, path: Path) -> Image.Image:
        """Return the decoded (downscaled) RGB image of a readable example."""
        img = self._cache.get(path)
        if img is None:  # beyond the cache: decode again
            img, error = _load(path, self._preprocess, self._edge)
            if error is not None:
                raise FinetuneError(f"{path} can no longer be read: {error}")
            assert img is not None  # _load returns an image or the reason it has none
        return img

    # -- batches -------------------------------------------------------------------------

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Return the order of the training examples in epoch `epoch` (0-based)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self.train))

    def train_batch(self, indices, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (pixels (B, 3, H, W) float32, labels (B,) int64), augmented."""
        pixels = []
        for i in indices:
            rng = np.random.default_rng([seed, epoch, int(i)])
            crop = self._augment(self.image(self.train[i].path), rng)
            pixels.append(self.normalise(crop))
        labels = np.array([self.train[i].label for i in indices], dtype=np.int64)
        return np.stack(pixels), labels

    def val_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (pixels, labels) of the validation images, preprocessed as for indexing."""
        for start in range(0, len(self.val), batch_size):
            chunk = self.val[start : start + batch_size]
            pixels = np.stack([self.eval_preprocess(self.image(e.path)) for e in chunk])
            yield pixels, np.array([e.label for e in chunk], dtype=np.int64)

    def _augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Return a random resized crop of `img` at the input size, mirrored half the time."""
        width, height = img.size
        box = (0, 0, width, height)
        for _ in range(CROP_ATTEMPTS):
            area = width * height * rng.uniform(*CROP_SCALE)
            ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (x, y, x + w, y + h)
                break
        out = img.resize((self.width, self.height), resample=self.resample, box=box)
        if rng.random() < FLIP_PROBABILITY:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


def _load(
    path: Path, preprocess: Preprocessing, edge: int
) -> tuple[Image.Image | None, str | None]:
    """Return (RGB image with its shortest edge at most `edge`, None) or (None, reason)."""
    try:
        img = decode_image(read_image_file(path), MAX_IMAGE_PIXELS, draft=preprocess, name=path)
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a bug in a codec must cost one file, not the run
        log.debug("unexpected error on %s", path, exc_info=True)
        return None, f"{type(exc).__name__}: {exc}"
    scale = edge / min(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, resample=Image.Resampling.LANCZOS)
    return img, None
