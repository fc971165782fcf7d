"""What a distillation trains on: an index's own images and stored vectors (the targets),
read once, preprocessed as the index preprocesses, with a seeded held-out share.

The stored vectors are the teacher's outputs for exactly these pixels, so no teacher runs.
Images go through the same safe reading and decoding as indexing; a file that cannot be read
(moved, deleted, damaged since it was indexed) is left out with one warning, never a crash.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch import config
from simsearch.errors import DistillError, ImageError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.objects import is_url, read_object
from simsearch.media.prefetch import read_ahead
from simsearch.media.preprocess import Preprocessing
from simsearch.progress import Progress, advance, set_total
from simsearch.storage.folder import IndexFolder
from simsearch.storage.manifest import Manifest

log = logging.getLogger(__name__)

# Preprocessed pixels are kept in memory in float16 (half of float32's bytes; the student
# trains in fp32 or bf16 from them, and fp16 holds normalised pixels to ~1e-3): 3,000
# images at 224 px take 0.9 GB.
PIXEL_DTYPE = np.float16

# The fewest images a distillation can measure itself on: recall@10 needs ten neighbours
# beyond the query, and the held-out share at least one query.
MIN_IMAGES = 12


@dataclass
class DistillData:
    """The index's images as pixels, their stored vectors, and the train/held-out split."""

    manifest: Manifest
    ids: np.ndarray  # int64, the images read (index ids), in id order
    pixels: np.ndarray  # (n, 3, H, W) PIXEL_DTYPE
    targets: np.ndarray  # (n, dim) float32, unit rows: the index's vectors of these images
    train: np.ndarray  # positions (into ids) of the training images
    held_out: np.ndarray  # positions of the held-out images
    all_vectors: np.ndarray  # (N, dim) float32: every vector of the index (the search space)
    all_ids: np.ndarray  # int64, their ids
    skipped: int
    fingerprint: str  # the images and vectors this run trains on: resume checks it

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The training positions in epoch `epoch`'s order: a function of (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(self.train)


def read_index_manifest(index: Path) -> Manifest:
    """The manifest of the index at `index` (which model made its vectors, and how)."""
    folder = IndexFolder.open(index)
    try:
        return folder.manifest
    finally:
        folder.close()


def read_index_data(
    index: Path,
    *,
    held_out: float,
    seed: int,
    max_images: int | None,
    workers: int,
    image_size: int | None = None,
    progress: Progress | None = None,
) -> DistillData:
    """Read `index`'s manifest, its stored vectors and (up to `max_images`, a seeded choice)
    its images, preprocessed with its preprocessing (scaled to `image_size` px a side when
    given: the student's); split off the `held_out` share."""
    folder = IndexFolder.open(index)
    try:
        manifest = folder.manifest
        ids, paths, vectors = [], [], []
        with folder.store.snapshot_items(manifest.dim) as (_total, _extras, chunks):
            for chunk_ids, chunk_paths, chunk_vectors, _ in chunks:
                ids.append(chunk_ids)
                paths.extend(chunk_paths)
                vectors.append(chunk_vectors)
    finally:
        folder.close()
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    all_vectors = np.concatenate(vectors) if vectors else np.empty((0, manifest.dim), np.float32)
    if len(all_ids) < MIN_IMAGES:
        raise DistillError(
            f"{index} holds {len(all_ids)} images; distilling needs at least {MIN_IMAGES} "
            "(to train on some and measure recall@10 on others)",
            param="index",
        )
    rng = np.random.default_rng([seed, 1])
    chosen = np.arange(len(all_ids))
    preprocess = Preprocessing.from_dict(manifest.preprocessing)
    if image_size is not None and image_size != preprocess.input_side():
        try:
            preprocess = preprocess.scaled_to(image_size)
        except ValueError as exc:
            raise DistillError(
                f"cannot give the student {image_size}-px images: {exc}; leave the image size out",
                param="image_size",
            ) from None
    shape = preprocess(Image.new("RGB", (64, 64))).shape
    if max_images is None:
        fits = max(MIN_IMAGES, config.DISTILL_MAX_PIXEL_BYTES // (np.prod(shape) * 2))
        if fits < len(chosen):
            log.warning(
                "training on a sample of %d of the index's %d images: their pixels fill "
                "the %.1f GiB kept in memory (say how many images to train on to choose)",
                fits,
                len(chosen),
                config.DISTILL_MAX_PIXEL_BYTES / (1 << 30),
            )
            max_images = int(fits)
    if max_images is not None and max_images < len(chosen):
        chosen = np.sort(rng.choice(chosen, max_images, replace=False))
    set_total(progress, len(chosen))
    pixels, kept = _read_pixels([paths[i] for i in chosen], preprocess, shape, workers, progress)
    chosen = chosen[kept]
    skipped = len(kept) - int(kept.sum())
    if len(chosen) < MIN_IMAGES:
        raise DistillError(
            f"only {len(chosen)} of the index's images could be read ({skipped} could not); "
            f"distilling needs at least {MIN_IMAGES}",
            param="index",
        )
    order = np.random.default_rng([seed, 2]).permutation(len(chosen))
    n_held = min(max(1, round(held_out * len(chosen))), len(chosen) - 1)
    digest = hashlib.sha256()
    digest.update(all_ids[chosen].tobytes())
    digest.update(all_vectors[chosen].tobytes())
    digest.update(manifest.weights_sha256.encode())
    return DistillData(
        manifest=manifest,
        ids=all_ids[chosen],
        pixels=pixels,
        targets=all_vectors[chosen],
        train=np.sort(order[n_held:]),
        held_out=np.sort(order[:n_held]),
        all_vectors=all_vectors,
        all_ids=all_ids,
        skipped=skipped,
        fingerprint=digest.hexdigest(),
    )


def _read_pixels(
    paths: list[str],
    preprocess: Preprocessing,
    shape: tuple,
    workers: int,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels of the readable images, a mask of which of `paths` were read), in one
    array allocated up front (a list of images stacked at the end held them twice)."""

    def load(path: str) -> np.ndarray | None:
        try:
            data = read_object(path) if is_url(path) else read_image_file(path)
            image = decode_image(data, draft=preprocess, name=path)
            return preprocess(image).astype(PIXEL_DTYPE)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s: %s", path, exc)
            return None

    pixels = np.empty((len(paths), *shape), PIXEL_DTYPE)
    kept = np.zeros(len(paths), dtype=bool)
    count = 0
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    with pool, closing(read_ahead(pool, load, paths, max(1, workers) * 4)) as ready:
        for i, result in enumerate(ready):
            if result is not None and result.shape != shape:
                log.warning("skipping %s: preprocessed to %s, not %s", paths[i], result.shape,
                            shape)  # fmt: skip
            elif result is not None:
                pixels[count] = result
                kept[i] = True
                count += 1
            advance(progress)
    return pixels[:count], kept
