"""The dedup threshold, calibrated on the index's own images.

The cosine at which two images are "the same picture" depends on the model: a fixed number
gives thousands of false duplicates with one model and misses half the copies with another.
So a sample of the indexed images is edited the way copies are made (crop, rescale, JPEG
re-encode, brightness, mirror, small rotation, border), the edited copies are embedded with
the index's model, and their similarity to the originals (copies: should be grouped) is set
against the similarity of each original to its nearest other indexed images (what dedup
would otherwise group by mistake). The threshold that separates the two best (highest
F-beta, precision weighted above recall) is kept, with the precision and recall it had on
the sample.

The nearest other images are exactly the candidates dedup examines, which makes them the
hard negatives that matter. But a collection that needs dedup holds copies already: a
neighbour more similar to the original than the median of the original's own edited
copies is taken to be one of them and left out of the negatives (at that similarity the
threshold groups it whatever it is, and counting it as a mistake would only push the
threshold up past real copies).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from simsearch.config import DEDUP_F_BETA
from simsearch.errors import ImageError
from simsearch.images import decode_image, read_image_file
from simsearch.records import Calibration

log = logging.getLogger(__name__)

# The edits a copy of a photo typically went through, each mild enough that a person would
# still call the result "the same photo".
EDITS = ("crop", "rescale", "jpeg", "brightness", "flip", "rotate", "border")


def edit(image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """Return an edited copy of `image`: one of EDITS, its strength drawn from `rng`."""
    w, h = image.size
    if name == "crop":  # keep 70-90 % of each side, anywhere in the frame
        cw, ch = (max(1, round(s * rng.uniform(0.7, 0.9))) for s in (w, h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((left, top, left + cw, top + ch))
    if name == "rescale":  # a thumbnail or a downsized upload: a third to two thirds
        f = rng.uniform(0.33, 0.66)
        return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    if name == "jpeg":  # re-saved by a phone or a messenger
        from io import BytesIO

        buf = BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(25, 50)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    if name == "brightness":
        factor = rng.choice([rng.uniform(0.65, 0.8), rng.uniform(1.25, 1.45)])
        return ImageEnhance.Brightness(image).enhance(float(factor))
    if name == "flip":
        return ImageOps.mirror(image)
    if name == "rotate":  # a straightened horizon: a few degrees, corners filled
        angle = float(rng.uniform(3, 8) * rng.choice([-1, 1]))
        return image.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    if name == "border":  # a frame or letterbox of 5-12 % of the short side
        pad = max(1, round(min(w, h) * rng.uniform(0.05, 0.12)))
        colour = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
        return ImageOps.expand(image, border=pad, fill=colour)
    raise ValueError(f"unknown edit {name!r}; one of {', '.join(EDITS)}")


def choose_threshold(
    copies: np.ndarray, others: np.ndarray, beta: float = DEDUP_F_BETA
) -> tuple[float, float, float]:
    """Return (threshold, precision, recall): the cut with the highest F-beta between
    `copies` (scores that should reach it) and `others` (scores that should not); among
    equally good cuts, the widest gap, and the threshold in its middle. beta < 1 weighs
    precision above recall."""
    scores = np.concatenate([copies, others]).astype(np.float64)
    is_copy = np.concatenate([np.ones(len(copies), bool), np.zeros(len(others), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_copy = scores[order], is_copy[order]
    # Cut i keeps the i + 1 highest scores.
    tp = np.cumsum(is_copy)
    fp = np.cumsum(~is_copy)
    fn = len(copies) - tp
    b2 = beta * beta
    f1 = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)
    below = np.append(scores[1:], scores[-1] - 0.02)
    # A cut between equal scores is no cut: it cannot be made with a threshold.
    valid = scores > below
    f1 = np.where(valid, f1, -1.0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    cut = best[np.argmax(scores[best] - below[best])]
    threshold = float((scores[cut] + below[cut]) / 2)
    precision = float(tp[cut] / (tp[cut] + fp[cut]))
    recall = float(tp[cut] / len(copies)) if len(copies) else 0.0
    return round(threshold, 4), precision, recall


def calibrate(
    store,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    embed: Callable[[Sequence[Image.Image]], np.ndarray],
    preprocess,
    *,
    sample: int,
    neighbours: int,
    seed: int = 0,
    progress=None,
) -> Calibration:
    """Calibrate on up to `sample` indexed images (files unchanged since indexing); each
    original's `neighbours` nearest other images are the negatives. Raises ValueError when
    the index is too small or no sampled file can be read."""
    rng = np.random.default_rng(seed)
    ids = store.vector_ids()
    if len(ids) < 2:
        raise ValueError(f"calibration needs at least 2 indexed images, this index has {len(ids)}")
    # Draw twice the sample: files that moved or changed since indexing are passed over.
    candidates = rng.permutation(ids)[: 2 * sample].tolist()
    facts = store.image_facts(candidates)
    if progress is not None:
        progress.total = min(sample, len(candidates))
        progress.refresh()
    originals, copy_scores, copy_edits, skipped = [], [], [], 0
    median_copy: dict[int, float] = {}
    batch: list[tuple[int, list[Image.Image]]] = []

    def flush() -> None:
        stored = store.vectors_by_id([i for i, _ in batch])
        vectors = embed([img for _, imgs in batch for img in imgs])
        rows = iter(vectors)
        for image_id, _ in batch:
            mine = [float(next(rows) @ stored[image_id]) for _ in EDITS]
            copy_scores.extend(mine)
            copy_edits.extend(EDITS)
            median_copy[image_id] = float(np.median(mine))
            originals.append(image_id)
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    for image_id in candidates:
        if len(originals) + len(batch) >= sample:
            break
        image = _unchanged_image(facts.get(image_id), preprocess)
        if image is None:
            skipped += 1
            continue
        batch.append((image_id, [edit(image, name, rng) for name in EDITS]))
        if len(batch) * len(EDITS) >= 64:
            flush()
    if batch:
        flush()
    if not originals:
        raise ValueError(
            f"none of the {skipped} sampled images could be read as they were indexed "
            "(moved or changed since?); run `simsearch index` first"
        )
    others = _nearest_others(store, search, originals, neighbours, median_copy)
    copies = np.asarray(copy_scores)
    threshold, precision, recall = choose_threshold(copies, others)
    edits = np.asarray(copy_edits)
    by_edit = {name: round(float(np.mean(copies[edits == name] >= threshold)), 4) for name in EDITS}
    return Calibration(
        threshold=threshold,
        precision=round(precision, 4),
        recall=round(recall, 4),
        images=len(originals),
        copies=len(copies),
        others=len(others),
        lowest_copy=round(float(copies.min()), 4),
        highest_other=round(float(others.max()), 4) if len(others) else None,
        recall_by_edit=by_edit,
        neighbours=neighbours,
        seed=seed,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _unchanged_image(facts: tuple | None, preprocess) -> Image.Image | None:
    """Decode an indexed file as indexing did, or None when it moved, changed or fails."""
    if facts is None:
        return None
    path, _, _, size, mtime_ns = facts
    try:
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return None
        return decode_image(read_image_file(path), draft=preprocess, name=path)
    except (OSError, ImageError) as exc:
        log.debug("calibration skips %s: %s", path, exc)
        return None


def _nearest_others(
    store, search, originals: list[int], neighbours: int, ceiling: dict[int, float]
) -> np.ndarray:
    """The scores of each original's `neighbours` nearest indexed images, leaving out
    itself, files with the same bytes (always grouped, whatever the threshold) and images
    scoring above its `ceiling` (copies already in the collection)."""
    same = {}
    for group in store.same_content():
        for member in group:
            same[member] = set(group)
    stored = store.vectors_by_id(originals)
    queries = np.stack([stored[i] for i in originals])
    scores, found = search(queries, neighbours + 1)
    others = []
    for image_id, row_scores, row_ids in zip(originals, scores, found, strict=True):
        skip = same.get(image_id, {image_id})
        others += [
            float(s)
            for s, other in zip(row_scores, row_ids.tolist(), strict=True)
            if other >= 0 and other not in skip and s <= ceiling[image_id]
        ][:neighbours]
    return np.asarray(others, dtype=np.float64)
