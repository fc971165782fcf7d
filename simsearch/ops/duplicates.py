"""An index's duplicates: finding the groups (ops.dedup), the calibrated threshold
(ops.calibrate) and acting on them (ops.moves)."""

from __future__ import annotations

import dataclasses
import logging

from simsearch.config import CALIBRATION_METHOD, CALIBRATION_SAMPLE, DEDUP_NEIGHBOURS
from simsearch.errors import QueryError
from simsearch.media.preprocess import Preprocessing
from simsearch.ops.calibrate import calibrate
from simsearch.ops.dedup import describe, find_groups
from simsearch.ops.parts import IndexParts
from simsearch.progress import Progress, set_total
from simsearch.records import Calibration, DuplicateGroup

log = logging.getLogger(__name__)


def duplicates(
    parts: IndexParts,
    threshold: float | None = None,
    *,
    neighbours: int = DEDUP_NEIGHBOURS,
    progress: Progress | None = None,
) -> list[DuplicateGroup]:
    """Return the groups of near-duplicate images (see `Index.duplicates`)."""
    store, cache = parts.store, parts.cache
    if threshold is None:
        threshold = dedup_calibration(parts, neighbours=neighbours).threshold
    if not -1.0 <= threshold <= 1.0:
        raise QueryError(f"a similarity threshold is between -1 and 1, not {threshold}")
    if neighbours < 1:
        raise QueryError("neighbours must be at least 1")
    set_total(progress, store.counts()[0])
    # Compressed indexes are searched without re-ranking (it would fetch k x 10 stored
    # vectors per image); every neighbour they return is checked on its stored vector
    # instead, since 4-bit PQ scores of a 0.99 copy can read as low as 0.77.
    exact = cache.in_ram().exact_scores
    return find_groups(
        store.iter_vectors(parts.manifest.dim),
        lambda vecs, k: cache.search(vecs, k, rerank=0),
        store.same_content(),
        lambda ids: {
            i: describe(path, facts) for i, (path, _, facts) in store.keep_facts(ids).items()
        },
        store.vectors_by_id,
        threshold,
        neighbours,
        margin=0.0 if exact else 2.0,
        progress=progress,
    )


def dedup_calibration(parts: IndexParts, *, neighbours: int = DEDUP_NEIGHBOURS) -> Calibration:
    """Return the index's calibrated dedup threshold, calibrating it first when it never was."""
    manifest = parts.manifest
    if manifest.dedup_calibration is None:
        log.warning("calibrating the dedup threshold of %s (once; it is kept)", parts.path)
        return calibrate_dedup(parts, neighbours=neighbours)
    stored = Calibration(**manifest.dedup_calibration)
    if stored.method < CALIBRATION_METHOD:
        # Kept, not redone behind the user's back: that needs the model and the files,
        # and would change what dedup reports.
        flaw = {
            1: "misses copies in collections that already hold many",
            2: "can group near-distinct pictures (bursts, views of one object)",
        }.get(stored.method, "is no longer used")
        log.warning(
            "the dedup threshold of %s (%.4f) was calibrated by an older method that "
            "%s; calibrate it again to use the current method",
            parts.path,
            stored.threshold,
            flaw,
        )
    return stored


def calibrate_dedup(
    parts: IndexParts,
    *,
    sample: int = CALIBRATION_SAMPLE,
    neighbours: int = DEDUP_NEIGHBOURS,
    seed: int = 0,
    progress: Progress | None = None,
) -> Calibration:
    """Pick the dedup threshold for the index's model and keep it in the manifest."""
    if sample < 1:
        raise QueryError("the calibration sample must be at least 1 image")
    if parts.store.read_only:
        raise QueryError(
            f"cannot calibrate the dedup threshold of {parts.path}: it is on read-only "
            "storage, where a calibration cannot be kept",
            path=parts.path,
            fix="threshold",
        )
    try:
        result = calibrate(
            parts.store,
            lambda vecs, k: parts.cache.search(vecs, k),
            parts.models.embed,
            Preprocessing.from_dict(parts.manifest.preprocessing),
            sample=sample,
            neighbours=neighbours,
            seed=seed,
            progress=progress,
        )
    except ValueError as exc:
        raise QueryError(f"cannot calibrate the dedup threshold: {exc}") from None
    with parts.writing():
        parts.set_manifest(
            dataclasses.replace(parts.manifest, dedup_calibration=dataclasses.asdict(result))
        )
    return result
