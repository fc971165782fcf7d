"""The Python API: `Index`, one object for creating, filling and searching an image index
(README, "Python API", shows it in use).

`Index` opens or creates the index folder (storage.folder), holds its model (models.provider)
and FAISS cache (search.cache), and hands each call to the function of `ops` that does it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simsearch import config, records
from simsearch.errors import IndexExistsError
from simsearch.ops import clustering, duplicates, maintenance, moves, undo, update
from simsearch.ops import query as searching
from simsearch.ops.parts import IndexParts, create_parts, open_parts
from simsearch.ops.query import Query
from simsearch.ops.ray_ingest import RaySettings
from simsearch.progress import Progress
from simsearch.search.vectors import VectorIndex
from simsearch.storage.manifest import DATABASE_FILE, Manifest
from simsearch.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["Index", "Query"]


class Index:
    """An image index: a folder holding the manifest, the SQLite store and the FAISS file.
    Make one with `create` or `open`; close it (or use `with`) when done. The model loads
    only when something needs it (adding images, searching by a new image).
    """

    def __init__(self, parts: IndexParts) -> None:
        self.parts = parts  # the folder, FAISS cache and model, that ops functions take

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: str | os.PathLike = config.DEFAULT_MODEL,
        *,
        layer: int | None = None,
        pool: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = config.DEFAULT_BATCH_SIZE,
        embedder=None,
        index_type: str = "auto",
        backend: str = "auto",
    ) -> Index:
        """Create a new, empty index at `path` for `model`, `layer` (-1: the last block) and
        `pool` ("cls"); loads the model to learn its dimension and preprocessing.

        IndexExistsError when an index is there. `embedder`: an Embedder already loaded,
        used instead of `model`, `layer`, `pool`, `device` and `batch_size`. `index_type`:
        see `set_index_type`. `backend` "auto": torch on CPUs with AMX (its bf16) and
        on GPUs; elsewhere ONNX Runtime in fp32 where onnxruntime and the exporter are
        installed (the model is exported once and cached, validated against PyTorch; a model
        that does not export faithfully falls back to torch with a notice), else torch;
        "torch"; "onnx": `model` is a folder `simsearch export-model` wrote (its layer and
        pooling are baked in) or a model to export.
        """
        return cls(
            create_parts(
                Path(path), model, layer=layer, pool=pool, device=device, precision=precision,
                batch_size=batch_size, embedder=embedder, index_type=index_type, backend=backend,
            )
        )  # fmt: skip

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        model: str | os.PathLike | None = None,
        layer: int | None = None,
        pool: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = config.DEFAULT_BATCH_SIZE,
        embedder=None,
        backend: str | None = None,
    ) -> Index:
        """Open an existing index. `model` (the same weights, maybe moved), `layer` and
        `pool`, when given, must match it (ManifestMismatchError). `embedder`: an Embedder
        already loaded, checked like `model`. `backend` None: the one it was built with;
        "onnx" or "torch" otherwise, `model` then an export of the index's model or its source.
        """
        return cls(
            open_parts(
                Path(path), model=model, layer=layer, pool=pool, device=device,
                precision=precision, batch_size=batch_size, embedder=embedder, backend=backend,
            )
        )  # fmt: skip

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        model: str | os.PathLike | None = None,
        *,
        layer: int | None = None,
        pool: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = config.DEFAULT_BATCH_SIZE,
        index_type: str | None = None,
        backend: str | None = None,
    ) -> Index:
        """Open the index at `path`, or create it there if there is none.

        Settings left as None take the existing index's values, or for a new index the
        defaults (DEFAULT_MODEL, the last layer, cls pooling, auto index type and backend);
        settings given must match, except `index_type`, which changes the existing index's
        type, and `backend`, which may embed an index's model with the other runtime.
        """
        common: dict[str, Any] = dict(layer=layer, pool=pool, device=device)
        common.update(precision=precision, batch_size=batch_size)
        if not (Path(path) / DATABASE_FILE).exists():
            log.info("creating index %s", path)
            try:
                return cls.create(
                    path, config.DEFAULT_MODEL if model is None else model, **common,
                    index_type=index_type or "auto", backend=backend or "auto",
                )  # fmt: skip
            except IndexExistsError:  # another process created it meanwhile: open it
                pass
        index = cls.open(path, model=model, backend=backend, **common)
        if index_type is not None and index_type.strip() != index.manifest.index_type:
            try:
                index.set_index_type(index_type)
            except BaseException:
                index.close()
                raise
        return index

    def close(self) -> None:
        self.parts.folder.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The index folder."""
        return self.parts.path

    @property
    def store(self) -> Store:
        """The SQLite store (storage.store), for tools that read the database directly."""
        return self.parts.store

    @property
    def manifest(self) -> Manifest:
        """The index's settings: model, layer, pooling, dimension, preprocessing, type."""
        return self.parts.manifest

    @property
    def backend(self) -> str:
        """How this index's model is run: "torch" or "onnx"."""
        return self.parts.models.backend

    @property
    def embedder(self):
        """The Embedder for this index's model, loaded on first use and checked against it."""
        return self.parts.models.embedder

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, loaded from disk when current, else rebuilt from the store."""
        return self.parts.cache.vectors

    def set_index_type(self, index_type: str) -> str | None:
        """Make the index use `index_type` ("auto", "flat", "hnsw", "ivf", "ivfpq" or a
        FAISS factory string such as "IVF1024,SQ8"), rebuilding it if that changes it.
        Returns why it was rebuilt, or None; IndexTypeError for a type FAISS cannot build.
        """
        return maintenance.set_index_type(self.parts, index_type)

    def embed(self, images: Sequence) -> np.ndarray:
        """Return one unit-norm float32 row per image (file paths or PIL images); a model
        whose output is not that raises ModelOutputError."""
        return self.parts.models.embed(images)

    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        workers: int = config.DEFAULT_WORKERS,
        prune: bool = True,
        max_pixels: int = config.MAX_IMAGE_PIXELS,
        progress: Progress | None = None,
        ray: RaySettings | None = None,
    ) -> records.AddSummary:
        """Bring the index up to date with the images under `paths` (files or folders).

        New and changed files are embedded, unchanged ones skipped unread, renamed and
        identical ones reuse stored vectors, vanished ones removed (unless `prune=False`);
        undecodable files and files over `max_pixels` are recorded (`failed()`). Each batch
        is committed as it completes. Takes the write lock (IndexLockedError). `ray`:
        read, decode and embed on a Ray cluster instead (needs simsearch[ray]).
        """
        return update.add(
            self.parts, paths, workers=workers, prune=prune, max_pixels=max_pixels,
            progress=progress, ray=ray,
        )  # fmt: skip

    def label_images(
        self,
        model: str | os.PathLike = config.DEFAULT_LABEL_MODEL,
        *,
        top: int | None = None,
        device: str | None = None,
        precision: str | None = None,
        batch_size: int | None = None,
        workers: int = config.DEFAULT_WORKERS,
        progress: Progress | None = None,
        labeller=None,
    ) -> records.LabelSummary:
        """Store the top labels of every indexed image that has none, from classifier `model`
        (a hub id or folder with a trained head, else ModelLoadError).

        Labels of another model or another `top` are replaced (`top` None: the stored
        count, else 5). Committed in batches; a run with nothing to label loads no model.
        `device`, `precision`, `batch_size` default to the index's; `labeller`: a Labeller
        already loaded. Takes the write lock; changes no vector.
        """
        return update.label_images(
            self.parts, model, top=top, device=device, precision=precision,
            batch_size=batch_size, workers=workers, progress=progress, labeller=labeller,
        )  # fmt: skip

    def labels(self, image: str | os.PathLike | int) -> list[records.Label]:
        """Return the stored labels of an indexed image (path, id or "id:N"), best first;
        [] when it has none. QueryError when it is not indexed."""
        return searching.labels(self.parts, image)

    def search(self, query: Query, k: int = config.DEFAULT_K, **params) -> list[records.Hit]:
        """Return the `k` indexed images most similar to `query`, best first: an image file,
        a PIL image, an indexed image's id (an int or "id:N") or a vector (normalised here:
        scores are cosines). `params`: see `search_many`."""
        return self.search_many([query], k, **params)[0]

    def search_many(
        self,
        queries: Sequence[Query],
        k: int = config.DEFAULT_K,
        *,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        within: Iterable[int] | None = None,
        label: str | None = None,
        cluster: int | None = None,
    ) -> list[list[records.Hit]]:
        """Return the hits for each query, answering all of them in one FAISS call.

        `nprobe` (IVF lists visited), `ef` (HNSW candidates), `rerank` (exact re-ranking
        over k x `rerank` candidates of compressed scores; 0: off): more is more accurate
        and slower. `within`: only these ids (the best k among them). `label`: only images
        with this label or a comma-separated synonym; `cluster`: only images of this cluster
        of the last `cluster` run (QueryError where there are none).
        """
        return searching.search_many(
            self.parts, queries, k, nprobe=nprobe, ef=ef, rerank=rerank, within=within,
            label=label, cluster=cluster,
        )  # fmt: skip

    def duplicates(
        self,
        threshold: float | None = None,
        *,
        neighbours: int = config.DEDUP_NEIGHBOURS,
        progress: Progress | None = None,
    ) -> list[records.DuplicateGroup]:
        """Return the groups of near-duplicate images: pairs at cosine >= `threshold` among
        each image's `neighbours` nearest, joined transitively, and byte-identical files.

        Each group names the image to keep (a real file over a link, then true resolution,
        lossless, file size, age, shorter path) and the others with their similarity and
        the facts the rule compared; paths naming one file are one member. `threshold`
        None: the index's calibrated threshold (calibrated now if it never was).
        """
        return duplicates.duplicates(
            self.parts, threshold, neighbours=neighbours, progress=progress
        )

    def dedup_calibration(
        self, *, neighbours: int = config.DEDUP_NEIGHBOURS
    ) -> records.Calibration:
        """The calibrated dedup threshold; calibrated first if it never was."""
        return duplicates.dedup_calibration(self.parts, neighbours=neighbours)

    def calibrate_dedup(
        self,
        *,
        sample: int = config.CALIBRATION_SAMPLE,
        neighbours: int = config.DEDUP_NEIGHBOURS,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> records.Calibration:
        """Pick the dedup threshold for this index's model and keep it in the manifest:
        the one that best separates edited copies of `sample` indexed images from their
        `neighbours` nearest other images (see ops.calibrate). Needs the model and the files.
        """
        return duplicates.calibrate_dedup(
            self.parts, sample=sample, neighbours=neighbours, seed=seed, progress=progress
        )

    def move_duplicates(
        self, groups: Sequence[records.DuplicateGroup], target: str | os.PathLike
    ) -> records.MoveReport:
        """Move each group's duplicates (not the kept images) under `target`, keeping their
        relative paths, and remove them from the index; each move is logged first in a
        manifest that `undo_moves` reverses. Changed files, or those whose kept image is
        gone, are left alone and listed in the report."""
        return moves.move(self.parts, groups, Path(target))

    def delete_duplicates(self, groups: Sequence[records.DuplicateGroup]) -> records.MoveReport:
        """Delete each group's duplicates (not the kept images), for good, and remove them
        from the index; the same checks as `move_duplicates`."""
        return moves.delete(self.parts, groups)

    def undo_moves(self, manifest: str | os.PathLike) -> records.MoveReport:
        """Put back every file `move_duplicates` logged in `manifest`, into the index with its
        vector (no model needed). Safe to run again, after a crash too; a file whose path is
        taken again is left where it is and reported."""
        return undo.undo(self.parts, Path(manifest))

    def cluster(
        self, k: int | str, *, seed: int = 0, progress: Progress | None = None
    ) -> records.ClusterRun:
        """Cluster every indexed image by spherical k-means into `k` clusters (2 up to the
        number of images, or "auto": by silhouette), store each image's cluster, and return
        how the run went.

        Memory stays bounded at any size (see ops.cluster); clusters are numbered by size,
        1 the largest; the new clustering replaces the last in one transaction. `seed`
        makes runs repeatable. Takes the write lock; ClusterError for an unusable `k`.
        """
        return clustering.cluster(self.parts, k, seed=seed, progress=progress)

    def clustering(self) -> records.ClusterRun | None:
        """Return how the stored clustering was made, or None if `cluster` never ran."""
        return clustering.clustering(self.parts)

    def clusters(self, top: int = config.CLUSTER_TOP) -> list[records.Cluster]:
        """Return the stored clusters, 1 (the largest) first: size now, cohesion (mean
        cosine to the centre) and the `top` images nearest the centre. Computes nothing;
        empty if `cluster` never ran. Images removed since the run are gone from their
        cluster, images added since are in none."""
        return clustering.clusters(self.parts, top)

    def cluster_members(self, cluster: int) -> list[records.Hit]:
        """Return every image of `cluster` (of the last `cluster` run), nearest its centre
        first; score: cosine similarity to the centre. QueryError for no such cluster."""
        return clustering.cluster_members(self.parts, cluster)

    def export(
        self,
        output: str | os.PathLike,
        format: str = "npy",
        progress: Progress | None = None,
        *,
        shard_rows: int | None = None,
    ) -> int:
        """Write every indexed image's id, path, vector, labels and cluster to `output`
        ("npy": a folder, "csv", "parquet"; parquet with `shard_rows`: a folder of files of
        that many rows), from one snapshot, renamed into place when complete; return how
        many."""
        return update.export(self.parts, output, format, progress, shard_rows)

    def verify(self) -> list[str]:
        """Return a description of every broken invariant (none: the index is sound) of
        the database, manifest.json and vectors.faiss."""
        return maintenance.verify(self.parts)

    def repair(self) -> list[str]:
        """Rebuild what can be rebuilt from the database; return what was done: damaged
        vectors are dropped and their images embedded again by the next `add`, strays
        deleted, manifest.json and vectors.faiss rewritten, a damaged manifest or
        generation in the database restored. A damaged database is IndexFormatError.
        """
        return maintenance.repair(self.parts)

    def info(self) -> records.IndexInfo:
        """Return counts, settings and size on disk."""
        return maintenance.info(self.parts)

    def roots(self) -> list[str]:
        """The folders and files `add` has been given (absolute paths), first given first."""
        return self.parts.store.roots()

    def failed(self) -> list[records.FailedFile]:
        """Return every file that could not be indexed, with the reason."""
        return self.store.failed()

    def __len__(self) -> int:
        return self.store.counts()[0]
