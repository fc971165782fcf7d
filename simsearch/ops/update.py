"""Writing an index from its files: the index run (ops.ingest), labels (ops.label); and
reading it out whole (ops.export)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterable
from pathlib import Path

from simsearch.config import DEFAULT_LABEL_MODEL, DEFAULT_WORKERS, MAX_IMAGE_PIXELS
from simsearch.errors import DatabaseOperationalError, StorageError
from simsearch.media.objects import is_url
from simsearch.ops.export import export as export_items
from simsearch.ops.ingest import Stopwatch, ingest
from simsearch.ops.label import Labeller, label_index
from simsearch.ops.parts import IndexParts
from simsearch.ops.ray_ingest import RaySettings, embedded_on_ray
from simsearch.progress import Progress, set_total
from simsearch.records import AddSummary, LabelSummary
from simsearch.storage.manifest import DATABASE_FILE


def add(
    parts: IndexParts,
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    workers: int = DEFAULT_WORKERS,
    prune: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
    progress: Progress | None = None,
    ray: RaySettings | None = None,
) -> AddSummary:
    """Bring the index up to date with the images under `paths` (see `Index.add`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    # "~/Pictures" as a shell would read it: a path starting with ~ is never meant as a
    # folder named "~" in the working directory.
    # Object-store URLs (s3://bucket/prefix) are kept as they are.
    folders = [p if is_url(p) else Path(p).expanduser() for p in paths]
    cache = parts.cache
    with parts.writing():
        # The model loads when the first file needs it: a run that finds nothing new
        # never pays for it (seconds for ViT-L).
        embedder = parts.models.on_demand()
        cache.writable()
        cache.last_rebuild = None
        stopwatch = Stopwatch()
        remote = None
        if ray is not None:
            # Each worker loads the model itself; on CPUs unless it is given GPUs.
            device = parts.models.device
            if not ray.gpus_per_worker and device == "auto":
                device = "cpu"
            spec = parts.models.spec(device=device)
            remote = functools.partial(_on_ray, spec=spec, settings=ray)
        try:
            summary = ingest(
                folders,
                parts.store,
                cache,
                embedder,
                workers=workers,
                prune=prune,
                max_pixels=max_pixels,
                progress=progress,
                checkpoint=cache.checkpoint,
                stopwatch=stopwatch,
                remote=remote,
            )
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and not cache.mirror_pending:
                # Ctrl-C waits for a batch's commit and its mirror (ops.writer), so the
                # index in memory is the database's: saved, `verify` passes, and the
                # next run continues without rebuilding it.
                with contextlib.suppress(Exception):
                    cache.save()
            # Otherwise it may be a batch behind the database (an error between a
            # commit and its mirror), so it is dropped, not saved: the next open
            # rebuilds it from the database.
            cache.drop()
            cache.mirror_pending = False
            if isinstance(exc, DatabaseOperationalError):
                raise StorageError(
                    f"cannot write to {parts.path / DATABASE_FILE}: {exc.orig}. Everything "
                    "committed before this is kept; fix the cause (free disk space?) and "
                    "run the same command again to continue"
                ) from None
            raise
        with stopwatch("faiss"):
            cache.checkpoint()
        parts.store.add_roots([str(f) if is_url(f) else os.path.abspath(f) for f in folders])
        return dataclasses.replace(
            summary, stages=dict(stopwatch.seconds), rebuilt=cache.last_rebuild
        )


def _on_ray(todo, hashes, max_pixels, *, spec, settings):
    return embedded_on_ray(todo, spec, hashes, max_pixels, settings)


def label_images(
    parts: IndexParts,
    model: str | os.PathLike = DEFAULT_LABEL_MODEL,
    *,
    top: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    labeller=None,
) -> LabelSummary:
    """Store the top labels of every indexed image that has none (see `Index.label_images`)."""
    models = parts.models

    def load():
        return labeller or Labeller(
            model,
            device=device or models.device,
            precision=precision or models.precision,
            batch_size=batch_size or models.batch_size,
        )

    with parts.writing():
        return label_index(
            parts.store,
            labeller.name if labeller is not None else model,
            load,
            top=top,
            workers=workers,
            progress=progress,
        )


def export(
    parts: IndexParts,
    output: str | os.PathLike,
    format: str = "npy",
    progress: Progress | None = None,
    shard_rows: int | None = None,
) -> int:
    """Write every indexed image's id, path and vector to `output` (see `Index.export`)."""
    dim = parts.manifest.dim
    with parts.store.snapshot_items(dim) as (total, extras, chunks):
        set_total(progress, total)
        return export_items(
            chunks,
            total,
            dim,
            Path(output),
            format,
            progress,
            extras=extras,
            shard_rows=shard_rows,
        )
