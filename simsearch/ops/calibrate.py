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
hard negatives that matter. But a collection that needs dedup holds copies already, and
those copies are not mistakes: counted as negatives, they push the threshold up past the
copies it should find. Which neighbours are copies is unknown, but how copies of an image
score is known from its edited copies, so, per sampled image:

- The level: the median of its edited copies' scores against it and against each other
  (two copies of one original are neighbours too, and score lower than either does
  against the original).
- The neighbours above that level are taken for copies, and so is a neighbour above it
  against one of those (a copy of a copy). They count as no mistake; every other
  neighbour counts as one.

And how many copies the collection holds sets what a threshold is worth. Seven edited
copies per sampled image say how copies score, not how many there are: counted as seven
real copies each, they outweigh the few real near-duplicate pictures (bursts, views of
one object) a threshold must not group, and the cut falls among those. So the edited
copies stand, together, for the copies taken among the neighbours, and the cut is the one
with the best F1 of those copies against the mistakes: on a collection with few copies,
each picture grouped by mistake costs more than the copies a slightly higher cut misses.

Method 1 counted the neighbours below the median of the image's own edited copies as
mistakes: where half the pictures had 1-10 copies it set 0.972 where the best cut was
0.915 and found half of the copy pairs. Method 2 also took for copies as many again of
the neighbours below the level, and counted each edited copy as a real one; it set 0.924
there, but 0.916-0.932 on collections of near-distinct shots, whose best cut was
0.931-0.957 (benchmarks/dedup_quality.py, figures in docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from simsearch.config import CALIBRATION_METHOD, DEDUP_F_BETA
from simsearch.errors import ImageError, QueryError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.progress import Progress, advance, set_total
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
        return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
    if name == "jpeg":  # re-saved by a phone or a messenger
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
        return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if name == "border":  # a frame or letterbox of 5-12 % of the short side
        pad = max(1, round(min(w, h) * rng.uniform(0.05, 0.12)))
        colour = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
        return ImageOps.expand(image, border=pad, fill=colour)
    raise ValueError(f"unknown edit {name!r}; one of {', '.join(EDITS)}")


def choose_threshold(
    copies: np.ndarray,
    others: np.ndarray,
    beta: float = DEDUP_F_BETA,
    weights: np.ndarray | None = None,
    copies_expected: float | None = None,
) -> tuple[float, float, float]:
    """Return (threshold, precision, recall): the cut with the highest F-beta between
    `copies` (scores that should reach it) and `others` (scores that should not, each
    counted as `weights` mistakes, 1 if None); among equally good cuts, the widest gap, and
    the threshold in its middle. `copies_expected`: how many real copies the scores stand
    for (the edited copies are then a sample of their scores, each counting
    copies_expected / len(copies)); None counts each edited copy as one. beta < 1 weighs
    precision above recall."""
    if weights is None:
        weights = np.ones(len(others))
    each = 1.0 if copies_expected is None or not len(copies) else copies_expected / len(copies)
    scores = np.concatenate([copies, others]).astype(np.float64)
    found = np.concatenate([np.full(len(copies), each), np.zeros(len(others))])
    mistake = np.concatenate([np.zeros(len(copies)), np.asarray(weights, np.float64)])
    order = np.argsort(-scores, kind="stable")
    scores, found, mistake = scores[order], found[order], mistake[order]
    # Cut i keeps the i + 1 highest scores.
    total = each * len(copies)
    tp = np.cumsum(found)
    fp = np.cumsum(mistake)
    fn = total - tp
    b2 = beta * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)
    f = np.nan_to_num(f, nan=0.0)
    below = np.append(scores[1:], scores[-1] - 0.02)
    # A cut between equal scores is no cut: it cannot be made with a threshold.
    valid = scores > below
    f = np.where(valid, f, -1.0)
    best = np.flatnonzero(f >= f.max() - 1e-12)
    cut = best[np.argmax(scores[best] - below[best])]
    threshold = float((scores[cut] + below[cut]) / 2)
    # Four decimals read well, but must not move the cut across a score.
    digits = next((d for d in (4, 5, 6) if below[cut] < round(threshold, d) <= scores[cut]), 9)
    kept = tp[cut] + fp[cut]
    precision = float(tp[cut] / kept) if kept > 0 else 1.0
    recall = float(tp[cut] / total) if total > 0 else 0.0
    return round(threshold, digits), precision, recall


def mistake_weights(
    neighbours: np.ndarray,
    copies: np.ndarray,
    between: np.ndarray | None = None,
    siblings: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Return (weights, copies found): how much of each of one image's `neighbours`
    (scores, best first) counts as a mistake (1, or 0 for a neighbour taken for a copy),
    and how many were taken for copies, given the scores of its edited `copies` against it,
    of its edited copies against each other (`siblings`) and of its neighbours against each
    other (`between`, a square matrix). See the module's docstring."""
    neighbours = np.asarray(neighbours, np.float64)
    if not len(neighbours):
        return neighbours, 0.0
    reference = np.concatenate([copies, [] if siblings is None else siblings])
    level = float(np.median(reference))
    known = neighbours > level
    if between is not None:
        while True:  # copies of its copies
            grown = known | (between[:, known] > level).any(axis=1)
            if grown.sum() == known.sum():
                break
            known = grown
    return np.where(known, 0.0, 1.0), float(known.sum())


@dataclass(frozen=True)
class Inputs:
    """What a calibration decides from: per sampled image (by id), its edited copies'
    scores against it (`copies`, in EDITS order) and against each other (`siblings`, the
    upper triangle), its nearest other images' scores (`neighbours`, best first) and their
    scores against each other (`between`, a square matrix)."""

    originals: list[int]
    copies: dict[int, np.ndarray]
    siblings: dict[int, np.ndarray]
    neighbours: dict[int, np.ndarray]
    between: dict[int, np.ndarray]
    k: int  # neighbours asked for per image
    seed: int


def calibrate(
    store,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    embed: Callable[[Sequence[Image.Image]], np.ndarray],
    preprocess,
    *,
    sample: int,
    neighbours: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> Calibration:
    """Calibrate on up to `sample` indexed images (files unchanged since indexing); each
    original's `neighbours` nearest other images are the negatives. Raises ValueError when
    the index is too small or no sampled file can be read."""
    inputs = gather(
        store,
        search,
        embed,
        preprocess,
        sample=sample,
        neighbours=neighbours,
        seed=seed,
        progress=progress,
    )
    return decide(inputs)


def gather(
    store,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    embed: Callable[[Sequence[Image.Image]], np.ndarray],
    preprocess,
    *,
    sample: int,
    neighbours: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> Inputs:
    """Edit and embed up to `sample` indexed images and find their `neighbours` nearest
    other images: a calibration's inputs (see `calibrate`)."""
    rng = np.random.default_rng(seed)
    ids = store.vector_ids()
    if len(ids) < 2:
        raise ValueError(f"calibration needs at least 2 indexed images, this index has {len(ids)}")
    # Draw twice the sample: files that moved or changed since indexing are passed over.
    candidates = rng.permutation(ids)[: 2 * sample].tolist()
    facts = store.image_facts(candidates)
    set_total(progress, min(sample, len(candidates)))
    originals, skipped = [], 0
    own_copies: dict[int, np.ndarray] = {}
    own_siblings: dict[int, np.ndarray] = {}
    batch: list[tuple[int, list[Image.Image]]] = []

    def flush() -> None:
        stored = store.vectors_by_id([i for i, _ in batch])
        vectors = embed([img for _, imgs in batch for img in imgs])
        rows = iter(vectors)
        for image_id, _ in batch:
            edited = np.stack([next(rows) for _ in EDITS])
            own_copies[image_id] = (edited @ stored[image_id]).astype(np.float64)
            own_siblings[image_id] = (edited @ edited.T)[np.triu_indices(len(EDITS), 1)]
            originals.append(image_id)
        advance(progress, len(batch))
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
        raise QueryError(
            f"cannot calibrate the dedup threshold: none of the {skipped} sampled images could "
            "be read as they were indexed (moved or changed since?)",
            fix="add-images",
        )
    nearest = _nearest_others(store, search, originals, neighbours)
    return Inputs(
        originals=originals,
        copies=own_copies,
        siblings=own_siblings,
        neighbours={i: nearest[i][0] for i in originals},
        between={i: nearest[i][1] for i in originals},
        k=neighbours,
        seed=seed,
    )


def decide(inputs: Inputs) -> Calibration:
    """Return the calibration (threshold, its expected precision and recall) that
    `inputs` give; see the module's docstring."""
    other_parts, weight_parts, expected, clear = [], [], 0.0, []
    for image_id in inputs.originals:
        mine, own = inputs.neighbours[image_id], inputs.copies[image_id]
        w, n = mistake_weights(mine, own, inputs.between[image_id], inputs.siblings[image_id])
        other_parts.append(mine)
        weight_parts.append(w)
        expected += n
        clear += mine[mine <= np.median(own)].tolist()
    others, weights = np.concatenate(other_parts), np.concatenate(weight_parts)
    copies = np.concatenate([inputs.copies[i] for i in inputs.originals])
    # However few copies the sample's neighbours seem to hold, one is assumed: with none,
    # any cut above the highest other image would do, and the widest gap is taken.
    threshold, precision, recall = choose_threshold(
        copies, others, weights=weights, copies_expected=max(expected, 1.0)
    )
    edits = np.tile(np.asarray(EDITS), len(inputs.originals))
    by_edit = {name: round(float(np.mean(copies[edits == name] >= threshold)), 4) for name in EDITS}
    return Calibration(
        threshold=threshold,
        precision=round(precision, 4),
        recall=round(recall, 4),
        images=len(inputs.originals),
        copies=len(copies),
        others=len(others),
        lowest_copy=round(float(copies.min()), 4),
        highest_other=round(max(clear), 4) if clear else None,
        recall_by_edit=by_edit,
        neighbours=inputs.k,
        seed=inputs.seed,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        copies_among_others=round(expected, 1),
        method=CALIBRATION_METHOD,
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
    store, search, originals: list[int], neighbours: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each original's `neighbours` nearest indexed images, leaving out itself and files
    with the same bytes (always grouped, whatever the threshold): their scores, best first,
    and their scores against each other (a square matrix)."""
    same = {}
    for group in store.same_content():
        for member in group:
            same[member] = set(group)
    stored = store.vectors_by_id(originals)
    queries = np.stack([stored[i] for i in originals])
    scores, found = search(queries, neighbours + 1)
    rows = []
    for image_id, row_scores, row_ids in zip(originals, scores, found, strict=True):
        skip = same.get(image_id, {image_id})
        kept = [
            (float(s), other)
            for s, other in zip(row_scores, row_ids.tolist(), strict=True)
            if other >= 0 and other not in skip
        ][:neighbours]
        rows.append((image_id, kept))
    vectors = store.vectors_by_id(sorted({o for _, kept in rows for _, o in kept}))
    others = {}
    for image_id, kept in rows:
        kept = [(s, o) for s, o in kept if o in vectors]  # removed since the search
        if kept:
            v = np.stack([vectors[o] for _, o in kept]).astype(np.float64)
            between = v @ v.T
        else:
            between = np.zeros((0, 0))
        others[image_id] = (np.asarray([s for s, _ in kept], dtype=np.float64), between)
    return others
