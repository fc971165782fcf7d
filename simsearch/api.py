"""The Python API: `Index`, one object for creating, filling and searching an image index.

from simsearch import Index

with Index.create("indexes/photos", model="/models/vit") as index:
    index.add(["~/Pictures"])
    for hit in index.search("query.jpg", k=5):
        print(hit.score, hit.path)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import numpy as np

from simsearch.config import (
    CALIBRATION_METHOD,
    CALIBRATION_SAMPLE,
    CLUSTER_TOP,
    DATABASE_FILE,
    DEDUP_NEIGHBOURS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_K,
    DEFAULT_LABEL_MODEL,
    DEFAULT_MODEL,
    DEFAULT_WORKERS,
    LOCK_WAIT_SECONDS,
    MANIFEST_FILE,
    MAX_IMAGE_PIXELS,
    VECTORS_FILE,
    Manifest,
)
from simsearch.errors import (
    ImageError,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
    ModelLoadError,
    QueryError,
    StorageError,
)
from simsearch.fs.files import remove_temp_leftovers, replaced_atomically
from simsearch.fs.lock import WriteLock
from simsearch.media.images import Preprocessing, decode_image, read_image_file
from simsearch.records import (
    AddSummary,
    Calibration,
    Cluster,
    ClusterRun,
    DuplicateGroup,
    FailedFile,
    Hit,
    IndexInfo,
    Label,
    LabelSummary,
    MoveReport,
)
from simsearch.search.cache import VectorCache
from simsearch.search.vectors import VectorIndex, plan_index, try_index_type
from simsearch.storage.checks import check_vectors
from simsearch.storage.schema import SCHEMA_VERSION
from simsearch.storage.store import Store

log = logging.getLogger(__name__)

Query = str | os.PathLike | int | np.ndarray


class Index:
    """An image index: a folder holding the manifest, the SQLite store and the FAISS file.

    Make one with `Index.create` or `Index.open`; close it (or use `with`) when done. The
    model is loaded only when something needs it (adding images, searching by a new image).
    """

    def __init__(
        self,
        path: Path,
        store: Store,
        *,
        model: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        embedder=None,
        backend: str | None = None,
    ) -> None:
        self.path = path
        self.store = store
        from sqlalchemy.exc import DatabaseError

        self._manifest_from_file = False
        self._repairing = False
        try:
            manifest = store.manifest()
        except DatabaseError as exc:
            store.close()
            raise IndexFormatError(_damaged(path, exc)) from None
        except IndexFormatError as exc:
            # The database's copy is damaged: manifest.json, written after it on every
            # change, stands in for reading and for `repair`, which writes it back.
            manifest = _manifest_file(path)
            if manifest is None or "version" in str(exc):
                store.close()
                raise
            log.warning("%s; using %s (`simsearch repair` restores it)", exc, MANIFEST_FILE)
            store.dim = manifest.dim
            self._manifest_from_file = True
        except BaseException:
            store.close()
            raise
        if manifest is None:
            store.close()
            raise IndexFormatError(f"{path} has a database but no manifest: it is not an index")
        _bring_up_to_date(store, path)
        self.manifest = manifest
        self._model = model or manifest.model
        # An index built with ONNX Runtime keeps using it unless told otherwise: its
        # manifest's model is then the export's folder, which torch cannot load.
        self.backend = _check_backend(backend or _backend_of(manifest))
        self._device = device
        self._precision = precision
        self._batch_size = batch_size
        self._embedder = embedder
        self._lock = WriteLock(path)
        self._cache = VectorCache(
            path, store, manifest.dim, self._lock, lambda: self.manifest.index_type
        )

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        layer: int | None = None,
        pool: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        embedder=None,
        index_type: str = "auto",
        backend: str = "torch",
    ) -> Index:
        """Create a new, empty index at `path` for `model`, `layer` and `pool`.

        Loads the model (to learn its dimension and preprocessing). Raises IndexExistsError
        when an index is already there. `layer` defaults to -1 (the last block), `pool` to
        "cls". `embedder`: an Embedder already loaded, used instead of `model`, `layer`,
        `pool`, `device` and `batch_size`. `index_type`: see `set_index_type`. `backend`:
        "torch", or "onnx" to embed with ONNX Runtime, `model` then being a folder that
        `simsearch export-model` wrote (its layer and pooling are baked in: `layer` and
        `pool`, if given, must be those).
        """
        path = Path(path)
        backend = _check_backend(backend)
        if (path / DATABASE_FILE).exists():
            raise IndexExistsError(f"an index already exists at {path}; open it instead")
        if embedder is not None:
            backend = _backend_of(embedder.manifest())  # what a later open will use
        elif backend == "onnx":
            embedder = _onnx_embedder(model, layer, pool, device, precision, batch_size)
        else:
            from simsearch.models.embed import Embedder

            embedder = Embedder(
                model,
                layer=-1 if layer is None else layer,
                pool=pool or "cls",
                device=device,
                precision=precision,
                batch_size=batch_size,
            )
        manifest = dataclasses.replace(embedder.manifest(), index_type=index_type.strip())
        try_index_type(manifest.index_type, manifest.dim)  # IndexTypeError if it is unusable
        path.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(path)
        lock.acquire(wait=LOCK_WAIT_SECONDS)  # another process creating it: wait, as writers do
        try:
            if (path / DATABASE_FILE).exists():
                raise IndexExistsError(f"an index already exists at {path}; open it instead")
            _create_database(path, manifest)
        finally:
            lock.release()
        return cls(
            path,
            Store(path / DATABASE_FILE),
            device=device,
            precision=precision,
            batch_size=batch_size,
            embedder=embedder,
            backend=backend,
        )

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
        batch_size: int = DEFAULT_BATCH_SIZE,
        embedder=None,
        backend: str | None = None,
    ) -> Index:
        """Open an existing index. `model`, `layer` and `pool`, when given, must match it.

        A mismatch raises ManifestMismatchError naming what differs. `model` may also point
        at the same weights in a new place (a moved folder), which the index then uses.
        `embedder`: an Embedder already loaded, checked against the index like `model`.
        `backend`: "torch" or "onnx" (`model` then an export of the index's model); None is
        the one the index was built with.
        """
        path = Path(path)
        if not (path / DATABASE_FILE).is_file():
            raise IndexNotFoundError(
                f"no index at {path}; create one with `simsearch index DIR --index {path}`"
            )
        index = cls(
            path,
            Store(path / DATABASE_FILE),
            model=None if model is None else str(model),
            device=device,
            precision=precision,
            batch_size=batch_size,
            embedder=embedder,
            backend=backend,
        )
        try:
            index._check_request(model, layer, pool)
        except BaseException:
            index.close()
            raise
        return index

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
        batch_size: int = DEFAULT_BATCH_SIZE,
        index_type: str | None = None,
        backend: str | None = None,
    ) -> Index:
        """Open the index at `path`, or create it there if there is none.

        Settings left as None take the existing index's values, or for a new index the
        defaults (DEFAULT_MODEL, the last layer, cls pooling, auto index type, torch);
        settings given must match, except `index_type`, which changes the existing index's
        type, and `backend`, which may embed an index's model with the other runtime.
        """
        if (Path(path) / DATABASE_FILE).exists():
            index = cls.open(
                path,
                model=model,
                layer=layer,
                pool=pool,
                device=device,
                precision=precision,
                batch_size=batch_size,
                backend=backend,
            )
            if index_type is not None and index_type.strip() != index.manifest.index_type:
                try:
                    index.set_index_type(index_type)
                except BaseException:
                    index.close()
                    raise
            return index
        log.info("creating index %s", path)
        try:
            return cls.create(
                path,
                model=DEFAULT_MODEL if model is None else model,
                layer=layer,
                pool=pool,
                device=device,
                precision=precision,
                batch_size=batch_size,
                index_type=index_type or "auto",
                backend=backend or "torch",
            )
        except IndexExistsError:  # another process created it meanwhile: use it
            return cls.open_or_create(
                path, model, layer=layer, pool=pool, device=device, precision=precision,
                batch_size=batch_size, index_type=index_type, backend=backend,
            )  # fmt: skip

    def set_index_type(self, index_type: str) -> str | None:
        """Make the index use `index_type` from now on, and rebuild it if that changes it.

        `index_type`: "auto" (exact search while small, then an HNSW graph, then compressed
        IVF-PQ codes with re-ranking, as the collection grows), "flat", "hnsw", "ivf",
        "ivfpq", or any FAISS factory string (e.g. "IVF1024,SQ8"). Returns why the FAISS
        index was rebuilt, or None when it was already what the type asks for. Raises
        IndexTypeError for a type FAISS cannot build.
        """
        index_type = index_type.strip()
        try_index_type(index_type, self.manifest.dim)  # IndexTypeError if it is unusable
        plan_index(index_type, len(self), self.manifest.dim)
        with self._writing():
            self._set_manifest(dataclasses.replace(self.manifest, index_type=index_type))
            reason = self._cache.maintain()
            if reason is not None:
                self._cache.save()
        return reason

    def _set_manifest(self, manifest: Manifest) -> None:
        """Record a changed setting in the database, then in manifest.json (hold the lock)."""
        self.store.set_manifest(manifest)
        _write_atomic(self.path / MANIFEST_FILE, manifest.to_json() + "\n")
        self.manifest = manifest

    def _check_request(self, model, layer: int | None, pool: str | None) -> None:
        from dataclasses import replace

        from simsearch.models.embed import resolve_layer

        if self._embedder is not None:
            self.manifest.check_compatible(self._embedder.manifest())
        wanted = self.manifest
        if layer is not None:
            wanted = replace(wanted, layer=resolve_layer(layer, self.manifest.num_layers))
        if pool is not None:
            wanted = replace(wanted, pool=pool)
        if model is not None and self._embedder is None and self.backend == "onnx":
            from simsearch.models.onnx import read_export_info

            # The export records its source weights' hash: checked without loading anything.
            source = read_export_info(model)["source"]
            wanted = replace(
                wanted,
                model=str(model),
                weights_sha256=source["weights_sha256"],
                config_sha256=source.get("config_sha256"),
            )
        elif model is not None and self._embedder is None:
            from simsearch.models.hub import hash_config, hash_weights, resolve_model

            folder, _ = resolve_model(str(model))
            wanted = replace(
                wanted,
                model=str(model),
                weights_sha256=hash_weights(folder),
                config_sha256=hash_config(folder),
            )
        self.manifest.check_compatible(wanted)

    def close(self) -> None:
        self._lock.release()
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model -----------------------------------------------------------------------

    @property
    def embedder(self):
        """The Embedder for this index's model, loaded on first use and checked against it."""
        if self._embedder is None:
            built_with = _backend_of(self.manifest)
            if self.backend != built_with and self._model == self.manifest.model:
                raise ModelLoadError(
                    f"this index was built with {built_with} from {self.manifest.model}; "
                    f"--backend {self.backend} needs --model: "
                    + (
                        "a folder that `simsearch export-model` made from that model"
                        if self.backend == "onnx"
                        else "the model that folder was exported from"
                    )
                )
            try:
                if self.backend == "onnx":
                    from simsearch.models.onnx import OnnxEmbedder

                    embedder = OnnxEmbedder(
                        self._model,
                        device=self._device,
                        precision=self._precision,
                        batch_size=self._batch_size,
                    )
                else:
                    from simsearch.models.embed import Embedder

                    embedder = Embedder(
                        self._model,
                        layer=self.manifest.layer,
                        pool=self.manifest.pool,
                        device=self._device,
                        precision=self._precision,
                        batch_size=self._batch_size,
                    )
            except ModelLoadError as exc:
                if self._model != self.manifest.model:
                    raise
                raise ModelLoadError(
                    f"{exc}. This index was built with that model; if it has moved, say where "
                    "it is now with --model (or SIMSEARCH_MODEL)"
                ) from None
            self.manifest.check_compatible(embedder.manifest())
            log.info("loaded %s: %s on %s", self._model, embedder.precision, embedder.device)
            self._embedder = embedder
        return self._embedder

    def embed(self, images: Sequence) -> np.ndarray:
        """Return one unit-norm float32 row per image (file paths or PIL images); a model
        whose output is not that raises ModelOutputError."""
        embedder = self.embedder
        vectors = embedder.embed_images([_as_image(img, embedder.preprocess) for img in images])
        return check_vectors(vectors, self.manifest.dim, f"the model {self._model}")

    # -- adding --------------------------------------------------------------------------

    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        workers: int = DEFAULT_WORKERS,
        prune: bool = True,
        max_pixels: int = MAX_IMAGE_PIXELS,
        progress=None,
    ) -> AddSummary:
        """Bring the index up to date with the images under `paths` (files or folders).

        New and changed files are embedded; unchanged ones are skipped unread; renamed and
        byte-identical files reuse stored vectors; files that disappeared from under `paths`
        are removed (unless `prune=False`); files that cannot be decoded, or that have more
        than `max_pixels` pixels, are recorded with the reason (see `failed()`). Each batch
        is committed as it completes, so an interrupted run loses nothing it committed.
        A leading ~ is the home folder. Takes the index's write lock (IndexLockedError when
        another process holds it). `progress` is an optional tqdm-like object.
        """
        from sqlalchemy.exc import OperationalError

        from simsearch.ops.ingest import Stopwatch, ingest

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        # "~/Pictures" as a shell would read it: a path starting with ~ is never meant as a
        # folder named "~" in the working directory.
        paths = [Path(p).expanduser() for p in paths]
        with self._writing():
            # The model loads when the first file needs it: a run that finds nothing new
            # never pays for it (seconds for ViT-L).
            embedder = self._embedder or _ModelOnDemand(self)
            self._cache.writable()
            self._cache.last_rebuild = None
            stopwatch = Stopwatch()
            try:
                summary = ingest(
                    paths,
                    self.store,
                    self._cache,
                    embedder,
                    workers=workers,
                    prune=prune,
                    max_pixels=max_pixels,
                    progress=progress,
                    checkpoint=self._cache.checkpoint,
                    stopwatch=stopwatch,
                )
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt) and not self._cache.mirror_pending:
                    # Ctrl-C waits for a batch's commit and its mirror (ingest), so the
                    # index in memory is the database's: saved, `verify` passes, and the
                    # next run continues without rebuilding it.
                    with contextlib.suppress(Exception):
                        self._cache.save()
                # Otherwise it may be a batch behind the database (an error between a
                # commit and its mirror), so it is dropped, not saved: the next open
                # rebuilds it from the database.
                self._cache.drop()
                self._cache.mirror_pending = False
                if isinstance(exc, OperationalError):
                    raise StorageError(
                        f"cannot write to {self.path / DATABASE_FILE}: {exc.orig}. Everything "
                        "committed before this is kept; fix the cause (free disk space?) and "
                        "run the same command again to continue"
                    ) from None
                raise
            with stopwatch("faiss"):
                self._cache.checkpoint()
            return dataclasses.replace(
                summary, stages=dict(stopwatch.seconds), rebuilt=self._cache.last_rebuild
            )

    def label_images(
        self,
        model: str | os.PathLike = DEFAULT_LABEL_MODEL,
        *,
        top: int | None = None,
        device: str | None = None,
        precision: str | None = None,
        batch_size: int | None = None,
        workers: int = DEFAULT_WORKERS,
        progress=None,
        labeller=None,
    ) -> LabelSummary:
        """Store the top labels of every indexed image that has none, from classifier `model`.

        `model`: an image classification checkpoint (hub id or folder); one without a
        trained head is a ModelLoadError. Each file is read again (run it after `add`).
        Labels from another model, or another `top`, are replaced: an index holds one
        model's labels. `top` None keeps the stored count for the same model, else 5.
        Committed in batches: an interrupted run continues where it stopped, and a run with
        nothing new to label does not load the model. `device`, `precision`, `batch_size`
        default to the index's. `labeller`: a Labeller already loaded, used instead of
        `model`. Takes the write lock; changes no vector.
        """
        from simsearch.ops.label import Labeller, label_index

        def load():
            return labeller or Labeller(
                model,
                device=device or self._device,
                precision=precision or self._precision,
                batch_size=batch_size or self._batch_size,
            )

        with self._writing():
            return label_index(
                self.store,
                labeller.name if labeller is not None else model,
                load,
                top=top,
                workers=workers,
                progress=progress,
            )

    def labels(self, image: str | os.PathLike | int) -> list[Label]:
        """Return the stored labels of an indexed image (path, id or "id:N"), best first;
        [] when it has none. QueryError when it is not indexed."""
        image_id = _parse_id(image)
        if image_id is None:
            known = self.store.lookup(os.path.abspath(cast("str | os.PathLike", image)))
            if known is None:
                raise QueryError(f"not an indexed image: {image}")
            image_id = known.id
        return self.store.labels_of([image_id]).get(image_id, [])

    def _label_ids(self, label: str) -> np.ndarray:
        """Return the ids of images having `label` among their stored labels (any synonym)."""
        from simsearch.ops.label import matching_labels, no_match_error

        source = self.store.label_source()
        if source is None:
            raise QueryError(
                "this index has no labels; add them with `simsearch index DIRS --label-model "
                f"{DEFAULT_LABEL_MODEL}` (or any image classification model)"
            )
        names = self.store.label_names()
        matched = matching_labels(label, names)
        ids = self.store.ids_with_labels(matched) if matched else np.empty(0, np.int64)
        if not len(ids):
            raise no_match_error(label, names, source)
        return ids

    @contextlib.contextmanager
    def _writing(self):
        """Hold the index's write lock for the block, and tidy what a crash left behind."""
        if self._lock.held:
            yield
            return
        if self._manifest_from_file and not self._repairing:
            raise IndexFormatError(
                f"the manifest in {self.path / DATABASE_FILE} is damaged; run `simsearch "
                f"repair` (it restores it from {MANIFEST_FILE}) before changing the index"
            )
        self._lock.acquire(wait=LOCK_WAIT_SECONDS)
        try:
            remove_temp_leftovers(self.path)  # only names simsearch makes, never a user's
            self.store.migrate()
            if not self._repairing:  # a damaged generation is what repair renews
                self._cache.begin_write()
            yield
        finally:
            self._lock.release()

    # -- searching -----------------------------------------------------------------------

    def search(self, query: Query, k: int = DEFAULT_K, **params) -> list[Hit]:
        """Return the `k` indexed images most similar to `query`, best first.

        `query` is an image file (indexed or not), a PIL image, an indexed image's id (an int
        or "id:N"), or a vector of the index's dimension (normalised here, so scores are
        cosine similarities). `params` (nprobe, ef, rerank, within, label, cluster): see
        `search_many`.
        """
        return self.search_many([query], k, **params)[0]

    def search_many(
        self,
        queries: Sequence[Query],
        k: int = DEFAULT_K,
        *,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        within: Iterable[int] | None = None,
        label: str | None = None,
        cluster: int | None = None,
    ) -> list[list[Hit]]:
        """Return the hits for each query, answering all of them in one FAISS call.

        For approximate index types: `nprobe` is the number of IVF lists visited (default
        DEFAULT_NPROBE), `ef` the HNSW candidate list (DEFAULT_EF); compressed scores are
        re-ranked exactly over k x `rerank` candidates (DEFAULT_RERANK; 0: off). Larger
        values find more of the true neighbours, more slowly. `within`: only these image
        ids may be returned (the best k among them, not a filtered top k). `label`: only
        images having this label (or one of its comma-separated synonyms, any case) among
        their stored labels; QueryError when the index has no labels or none has it.
        `cluster`: only images of this cluster of the last `cluster` run (QueryError if
        there is no such cluster).
        """
        # Checked first: a bad cluster is a QueryError before any model is loaded.
        members = (
            None if cluster is None else self.store.cluster_members(self._check_cluster(cluster))
        )
        for name, value in (("nprobe", nprobe), ("ef", ef), ("rerank", rerank)):
            if value is not None and value < (0 if name == "rerank" else 1):
                raise QueryError(f"{name} must be at least {0 if name == 'rerank' else 1}")
        if k < 1:
            raise QueryError("k must be at least 1")
        if not queries:
            return []
        vectors = [self._stored_query_vector(q) for q in queries]
        # Queries with no stored vector go through the model together, in batches.
        fresh = [q for q, v in zip(queries, vectors, strict=True) if v is None]
        embedded = iter(self.embed(fresh) if fresh else [])
        matrix = np.stack([next(embedded) if v is None else v for v in vectors])
        if within is not None:
            within = np.unique(np.fromiter(within, dtype=np.int64))
        if label is not None:
            labelled = self._label_ids(label)
            within = labelled if within is None else np.intersect1d(within, labelled)
        if members is not None:
            within = members if within is None else np.intersect1d(within, members)
        scores, ids = self._cache.search(
            matrix, k, nprobe=nprobe, ef=ef, rerank=rerank, within=within
        )
        paths = self.store.paths(np.unique(ids[ids >= 0]))
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            pairs = zip(row_scores, row_ids.tolist(), strict=True)
            results.append([Hit(i, paths[i], _score(s)) for s, i in pairs if i in paths])
        return results

    def _check_cluster(self, cluster: int) -> int:
        """Return `cluster` as an int if the last clustering made it, else QueryError."""
        run = self.clustering()
        if run is None:
            raise QueryError(
                "this index has no clusters yet: make them with `simsearch cluster -k K`"
            )
        if isinstance(cluster, bool) or not 1 <= int(cluster) <= run.clusters:
            raise QueryError(
                f"no cluster {cluster}: the last clustering made clusters 1 to {run.clusters}"
            )
        return int(cluster)

    def _stored_query_vector(self, query: Query) -> np.ndarray | None:
        """Return the query's vector when no model is needed for it, else None."""
        if isinstance(query, np.ndarray):
            if query.shape != (self.manifest.dim,):
                raise QueryError(f"a query vector must have shape ({self.manifest.dim},)")
            norm = float(np.linalg.norm(query))
            if not np.isfinite(norm) or norm == 0:
                raise QueryError("a query vector must be finite and non-zero")
            return (query / norm).astype(np.float32)
        image_id = _parse_id(query)
        if image_id is not None:
            vector = self.store.vector(image_id)
            if vector is None:
                raise QueryError(f"no indexed image has id {image_id}")
            return vector
        if isinstance(query, (str, os.PathLike)):
            return self._stored_vector_for(Path(query))
        return None

    def _stored_vector_for(self, path: Path) -> np.ndarray | None:
        """Return the stored vector of an indexed file that has not changed since, else None."""
        key = os.path.abspath(path)
        known = self.store.lookup(key)
        try:
            if known is None or not known.unchanged(os.stat(key)):
                return None
        except OSError:
            return None
        return self.store.vector(known.id)

    # -- duplicates ----------------------------------------------------------------------

    def duplicates(
        self,
        threshold: float | None = None,
        *,
        neighbours: int = DEDUP_NEIGHBOURS,
        progress=None,
    ) -> list[DuplicateGroup]:
        """Return the groups of near-duplicate images: pairs whose cosine similarity is at
        least `threshold` among each image's `neighbours` nearest, joined transitively, and
        byte-identical files. Each group names the image to keep (a real file over a link,
        then highest true resolution, then lossless over lossy, then largest file, then
        oldest, then shortest path) with the facts the rule compared, and the others with
        their similarity to it, best first, each with its facts and the rule that
        preferred the kept image. Paths naming one file (symlinks, hard links) are one
        member, never each other's duplicates. Memory: the index plus one chunk of vectors
        and the edges found, never an n x n matrix.
        `threshold` None: the index's calibrated threshold (see `calibrate_dedup`;
        calibrated now, once, if it never was). `progress`: a tqdm-like object.
        """
        from simsearch.ops.dedup import describe, find_groups

        if threshold is None:
            threshold = self.dedup_calibration(neighbours=neighbours).threshold
        if not -1.0 <= threshold <= 1.0:
            raise QueryError(f"a similarity threshold is between -1 and 1, not {threshold}")
        if neighbours < 1:
            raise QueryError("neighbours must be at least 1")
        if progress is not None:
            progress.total = len(self)
            progress.refresh()
        # Compressed indexes are searched without re-ranking (it would fetch k x 10 stored
        # vectors per image); every neighbour they return is checked on its stored vector
        # instead, since 4-bit PQ scores of a 0.99 copy can read as low as 0.77.
        exact = self._cache.in_ram().exact_scores
        return find_groups(
            self.store.iter_vectors(self.manifest.dim),
            lambda vecs, k: self._cache.search(vecs, k, rerank=0),
            self.store.same_content(),
            lambda ids: {
                i: describe(path, facts)
                for i, (path, _, facts) in self.store.keep_facts(ids).items()
            },
            self.store.vectors_by_id,
            threshold,
            neighbours,
            margin=0.0 if exact else 2.0,
            progress=progress,
        )

    def dedup_calibration(self, *, neighbours: int = DEDUP_NEIGHBOURS) -> Calibration:
        """Return the index's calibrated dedup threshold, calibrating it first (see
        `calibrate_dedup`) when it never was."""
        if self.manifest.dedup_calibration is None:
            log.warning("calibrating the dedup threshold of %s (once; it is kept)", self.path)
            return self.calibrate_dedup(neighbours=neighbours)
        stored = Calibration(**self.manifest.dedup_calibration)
        if stored.method < CALIBRATION_METHOD:
            # Kept, not redone behind the user's back: that needs the model and the files,
            # and would change what dedup reports.
            flaw = {
                1: "misses copies in collections that already hold many",
                2: "can group near-distinct pictures (bursts, views of one object)",
            }.get(stored.method, "is no longer used")
            log.warning(
                "the dedup threshold of %s (%.4f) was calibrated by an older method that "
                "%s; run `simsearch dedup --calibrate` to calibrate it again",
                self.path,
                stored.threshold,
                flaw,
            )
        return stored

    def calibrate_dedup(
        self,
        *,
        sample: int = CALIBRATION_SAMPLE,
        neighbours: int = DEDUP_NEIGHBOURS,
        seed: int = 0,
        progress=None,
    ) -> Calibration:
        """Pick the dedup threshold for this index's model and keep it in the manifest.

        Makes edited copies (crop, rescale, JPEG, brightness, mirror, rotation, border) of
        `sample` indexed images, embeds them, and returns the threshold that best separates
        them from each image's `neighbours` nearest other indexed images (less those
        estimated to be copies already), with the precision and recall it had there. Needs
        the model and the indexed files.
        """
        from simsearch.ops.calibrate import calibrate

        if sample < 1:
            raise QueryError("the calibration sample must be at least 1 image")
        if self.store.read_only:
            raise QueryError(
                f"cannot calibrate the dedup threshold of {self.path}: it is on read-only "
                "storage, where a calibration cannot be kept; pass --threshold"
            )
        try:
            result = calibrate(
                self.store,
                lambda vecs, k: self._cache.search(vecs, k),
                self.embed,
                Preprocessing.from_dict(self.manifest.preprocessing),
                sample=sample,
                neighbours=neighbours,
                seed=seed,
                progress=progress,
            )
        except ValueError as exc:
            raise QueryError(f"cannot calibrate the dedup threshold: {exc}") from None
        with self._writing():
            self._set_manifest(
                dataclasses.replace(self.manifest, dedup_calibration=dataclasses.asdict(result))
            )
        return result

    def move_duplicates(
        self, groups: Sequence[DuplicateGroup], target: str | os.PathLike
    ) -> MoveReport:
        """Move each group's duplicates (not the kept images) under `target`, keeping their
        paths relative to the folder that holds all the groups' files, and remove them from
        the index. Every move is logged first in a manifest in `target` (its path is in the
        report) that `undo_moves` reverses. Files changed since indexing, or whose kept
        image is gone, are left alone and listed in the report."""
        from simsearch.ops.moves import move

        return move(self, groups, Path(target))

    def delete_duplicates(self, groups: Sequence[DuplicateGroup]) -> MoveReport:
        """Delete each group's duplicates (not the kept images), for good, and remove them
        from the index; the same checks as `move_duplicates`."""
        from simsearch.ops.moves import delete

        return delete(self, groups)

    def undo_moves(self, manifest: str | os.PathLike) -> MoveReport:
        """Put back every file that `move_duplicates` moved and logged in `manifest`, and
        return them to the index with their stored vectors (no model needed). Safe to run
        again, and after a crash: files already in place are passed over; a file whose
        original path is taken again is left where it is and reported."""
        from simsearch.ops.moves import undo

        return undo(self, Path(manifest))

    # -- clusters ------------------------------------------------------------------------

    def cluster(self, k: int | str, *, seed: int = 0, progress=None) -> ClusterRun:
        """Cluster every indexed image by spherical k-means into `k` clusters, store each
        image's cluster, and return how the run went.

        `k`: 2 up to the number of images (at most CLUSTER_MAX_K), or "auto": the K from 2
        to CLUSTER_AUTO_MAX_K with the best mean silhouette on a sample. Training sees a
        random sample of at most CLUSTER_TRAIN_MAX vectors; every vector is then assigned
        to its nearest centre in chunks, so memory stays bounded at any size. Clusters are
        numbered by size, 1 the largest. The new clustering replaces the last one in one
        transaction. `seed` makes runs repeatable. Takes the write lock for the run (an
        `add` meanwhile gets IndexLockedError). Raises ClusterError for an unusable `k`.
        `progress`: a tqdm-like object, advanced per image assigned.
        """
        from simsearch.ops.cluster import check_k, cluster_vectors

        dim = self.manifest.dim
        check_k(k, len(self))  # ClusterError before waiting for the lock
        with self._writing():
            result = cluster_vectors(
                self.store.vector_ids(),
                self.store.vectors_by_id,
                lambda: self.store.iter_vectors(dim),
                dim,
                k,
                seed=seed,
                progress=progress,
            )
            self.store.replace_clusters(
                result.ids, result.labels, result.scores, json.dumps(dataclasses.asdict(result.run))
            )
        return result.run

    def clustering(self) -> ClusterRun | None:
        """Return how the stored clustering was made, or None if `cluster` never ran."""
        data = self.store.clustering()
        if data is None:
            return None
        known = {f.name for f in dataclasses.fields(ClusterRun)}
        data = {key: value for key, value in data.items() if key in known}
        data["candidates"] = tuple(tuple(pair) for pair in data.get("candidates", ()))
        return ClusterRun(**data)

    def clusters(self, top: int = CLUSTER_TOP) -> list[Cluster]:
        """Return the stored clusters, 1 (the largest) first: size now, cohesion (mean
        cosine to the centre) and the `top` images nearest the centre. Computes nothing;
        empty if `cluster` never ran. Images removed since the run are gone from their
        cluster, images added since are in none."""
        if top < 0:
            raise QueryError("top must be at least 0")
        if self.clustering() is None:
            return []
        return [
            Cluster(
                cluster,
                size,
                round(mean, 6),
                tuple(Hit(int(i), path, _score(score)) for i, path, score in best),
            )
            for cluster, size, mean, best in self.store.clusters(top)
        ]

    def cluster_members(self, cluster: int) -> list[Hit]:
        """Return every image of `cluster` (of the last `cluster` run), nearest its centre
        first; score: cosine similarity to the centre. QueryError for no such cluster."""
        rows = self.store.cluster_hits(self._check_cluster(cluster))
        return [Hit(int(i), path, _score(score)) for i, path, score in rows]

    # -- exporting -----------------------------------------------------------------------

    def export(self, output: str | os.PathLike, format: str = "npy", progress=None) -> int:
        """Write every indexed image's id, path and vector to `output`; returns how many.

        `format`: "npy" (a folder: vectors.npy, ids.npy, paths.txt), "csv" (id, path,
        vector as a JSON list) or "parquet" (needs pyarrow). Stored labels and clusters
        come along when the index has them (see simsearch/export.py). Reads one snapshot of the
        database (indexing may go on meanwhile), in chunks, and writes under a temporary
        name renamed into place when complete. `progress`: a tqdm-like object.
        """
        from simsearch.ops.export import export

        with self.store.snapshot_items(self.manifest.dim) as (total, extras, chunks):
            if progress is not None:
                progress.total = total
                progress.refresh()
            return export(
                chunks, total, self.manifest.dim, Path(output), format, progress, extras=extras
            )

    # -- the FAISS cache -----------------------------------------------------------------

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, loaded from disk when current, else rebuilt from the store."""
        return self._cache.vectors

    # -- checking and repairing ----------------------------------------------------------

    def verify(self) -> list[str]:
        """Return a description of every broken invariant; an empty list: the index is sound.

        Checks the database (SQLite integrity; every indexed image has one finite unit
        vector of the right dimension; no stray vectors), manifest.json against the
        database's manifest, and vectors.faiss against the database (generation, count,
        ids, and every vector). While a writer runs, vectors.faiss is reported as stale.
        """
        problems = []
        try:
            on_disk = Manifest.from_json((self.path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{MANIFEST_FILE} is missing")
        except Exception as exc:
            problems.append(f"{MANIFEST_FILE} is unreadable: {exc}")
        else:
            if on_disk != self.manifest:
                problems.append(f"{MANIFEST_FILE} differs from the manifest in {DATABASE_FILE}")
        from sqlalchemy.exc import DatabaseError

        try:
            report = self.store.check(self.manifest.dim)
        except DatabaseError as exc:
            return [*problems, _damaged(self.path, exc)]
        problems += report.problems
        if self._manifest_from_file:
            problems.append(
                f"the manifest in {DATABASE_FILE} is damaged ({MANIFEST_FILE} stands in)"
            )
        try:
            generation_ok = self.store.generation() >= 0
        except IndexFormatError as exc:
            problems.append(str(exc))
            generation_ok = False
        if not report.corrupt and not report.damaged and generation_ok:
            problems += self._cache.problems()
        return problems

    def repair(self) -> list[str]:
        """Rebuild what can be rebuilt from the database; return what was done.

        Damaged or missing vectors are dropped and their images marked to be embedded again
        by the next `add`; stray vectors are deleted; manifest.json and vectors.faiss are
        rewritten from the database; a damaged manifest in the database is restored from
        manifest.json, and a damaged generation number renewed. A damaged database itself
        cannot be repaired here (IndexFormatError).
        """
        actions = []
        self._repairing = True
        try:
            with self._writing():
                if self.store.repair_meta(self.manifest if self._manifest_from_file else None):
                    actions.append(f"renewed the generation numbers in {DATABASE_FILE}")
                if self._manifest_from_file:
                    self._manifest_from_file = False
                    actions.append(f"restored the manifest in {DATABASE_FILE} from {MANIFEST_FILE}")
                actions += self._repair_files()
        finally:
            self._repairing = False
        return actions

    def _repair_files(self) -> list[str]:
        from sqlalchemy.exc import DatabaseError

        actions = []
        try:
            report = self.store.check(self.manifest.dim)
        except DatabaseError as exc:
            raise IndexFormatError(_damaged(self.path, exc)) from None
        if report.corrupt:
            raise IndexFormatError(_damaged(self.path, report.problems[0]))
        redo = sorted(set(report.damaged) | set(report.unvectored))
        if redo:
            self.store.reset_vectors(
                redo, "its stored vector was damaged; the next `simsearch index` embeds it"
            )
            actions.append(
                f"marked {len(redo)} images with damaged or missing vectors to be "
                "embedded again by the next `simsearch index`"
            )
        if report.stray:
            self.store.delete_vectors(report.stray)
            actions.append(f"deleted {len(report.stray)} stray vectors")
        manifest_file = self.path / MANIFEST_FILE
        wanted = self.manifest.to_json() + "\n"
        try:
            current = manifest_file.read_text(encoding="utf-8")
        except (OSError, ValueError):  # missing, unreadable, not UTF-8
            current = None
        if current != wanted:
            _write_atomic(manifest_file, wanted)
            actions.append(f"rewrote {MANIFEST_FILE} from the database")
        if self._cache.problems():
            vectors = self._cache.rebuild()
            self._cache.save()
            actions.append(f"rebuilt {VECTORS_FILE} from the database ({len(vectors)} vectors)")
        return actions

    # -- reporting -----------------------------------------------------------------------

    def info(self) -> IndexInfo:
        """Return counts, settings and size on disk."""
        indexed, failed = self.store.counts()
        m = self.manifest
        built, vectors = self._cache.built, self.vectors
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        labels = self.store.label_source()
        clustering = self.clustering()
        return IndexInfo(
            path=str(self.path),
            indexed=indexed,
            failed=failed,
            model=m.model,
            weights_sha256=m.weights_sha256,
            revision=m.revision,
            architecture=m.architecture,
            dim=m.dim,
            layer=m.layer,
            num_layers=m.num_layers,
            pool=m.pool,
            precision=m.precision,
            preprocessing=m.preprocessing,
            size_bytes=size,
            format_version=m.format_version,
            index_type=m.index_type,
            index_built=built.get("kind", "flat"),
            index_factory=built.get("factory", "Flat"),
            index_reason=built.get("reason", ""),
            tombstones=vectors.tombstones,
            dedup_calibration=m.dedup_calibration,
            label_model=(labels or {}).get("model"),
            label_top=int((labels or {}).get("top", 0)),
            labelled=self.store.labelled_count(),
            clustering=clustering,
            clustered=0 if clustering is None else self.store.clustered_count(),
        )

    def failed(self) -> list[FailedFile]:
        """Return every file that could not be indexed, with the reason."""
        return self.store.failed()

    def __len__(self) -> int:
        return self.store.counts()[0]


BACKENDS = ("torch", "onnx")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _backend_of(manifest: Manifest) -> str:
    """Return the backend an index was built with: its precision says (onnx-fp32, ...)."""
    return "onnx" if manifest.precision.startswith("onnx-") else "torch"


def _onnx_embedder(model, layer, pool, device, precision, batch_size):
    """Return an OnnxEmbedder for the export `model`, checking `layer` and `pool` against
    what the export baked in."""
    from simsearch.errors import LayerError
    from simsearch.models.embed import resolve_layer
    from simsearch.models.onnx import OnnxEmbedder

    embedder = OnnxEmbedder(model, device=device, precision=precision, batch_size=batch_size)
    if layer is not None and resolve_layer(layer, embedder.num_layers) != embedder.layer:
        raise LayerError(
            f"the ONNX export {model} has layer {embedder.layer} baked in, not {layer}; "
            "export the model again with --layer"
        )
    if pool is not None and pool != embedder.pool:
        raise LayerError(
            f"the ONNX export {model} has {embedder.pool} pooling baked in, not {pool}; "
            "export the model again with --pool"
        )
    return embedder


class _ModelOnDemand:
    """What ingest needs of an Embedder, loading the index's model only when it is used."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self.batch_size = index._batch_size
        # The manifest's preprocessing is the model's: the check on loading guarantees it.
        self.preprocess = Preprocessing.from_dict(index.manifest.preprocessing)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        vectors = self._index.embedder.embed_pixels(pixels)
        return check_vectors(vectors, self._index.manifest.dim, f"the model {self._index._model}")


def _bring_up_to_date(store: Store, path: Path) -> None:
    """Refuse a database made by a newer simsearch; migrate an older one where it may be
    written. A migration that cannot run now (a read-only file, a writer holding the
    database past the busy timeout) is left to the next write, which runs it or fails."""
    from sqlalchemy.exc import DatabaseError, OperationalError

    try:
        store.check_schema()
        if not store.read_only and store.schema_version < SCHEMA_VERSION:
            done = store.migrate()
            if done:
                log.info("%s: schema migrated to version %d", path, done[-1])
    except (sqlite3.OperationalError, OperationalError) as exc:
        reason = getattr(exc, "orig", None) or exc
        log.warning("%s: schema migration deferred to the next write: %s", path, reason)
    except (sqlite3.DatabaseError, DatabaseError) as exc:
        store.close()
        raise IndexFormatError(_damaged(path, exc)) from None
    except BaseException:
        store.close()
        raise


def _manifest_file(path: Path) -> Manifest | None:
    """The index's manifest.json, or None when it is missing or damaged too."""
    try:
        return Manifest.from_json(
            (path / MANIFEST_FILE).read_text(encoding="utf-8"), str(path / MANIFEST_FILE)
        )
    except (OSError, ValueError, IndexFormatError):
        return None


def _parse_id(query: Query) -> int | None:
    if isinstance(query, (bool, np.bool_)):
        raise QueryError(f"not a query: {query!r}")
    if isinstance(query, (int, np.integer)):
        return _image_id(int(query))
    if isinstance(query, str) and query.startswith("id:"):
        try:
            return _image_id(int(query[3:]))
        except ValueError:
            raise QueryError(f"bad id query {query!r}: expected id:N with N an integer") from None
    return None


def _image_id(n: int) -> int:
    """`n` if it can be an image id (SQLite's 64-bit row ids), else a QueryError."""
    if not 0 <= n < 2**63:
        raise QueryError(f"no indexed image has id {n}: ids are 1 to {2**63 - 1}")
    return n


def _score(s) -> float:
    """A cosine as shown: float32 rounding can put a unit vector's own score at 1.0000001."""
    return round(min(1.0, max(-1.0, float(s))), 6)


def _as_image(image, preprocess):
    """Return a PIL RGB image for a path (decoded as indexing decodes it) or a PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from simsearch.media.images import to_rgb

        return to_rgb(image)
    path = Path(image)
    if not path.exists():
        hint = f" (to search with indexed image {image}, write id:{image})"
        raise QueryError(f"no such image file: {path}{hint if str(image).isdigit() else ''}")
    try:
        return decode_image(read_image_file(path), draft=preprocess, name=path)
    except ImageError as exc:
        raise QueryError(f"{path}: {exc}") from None


# What SQLite says when the storage, not the database, is at fault.
_STORAGE_ERRORS = (
    "unable to open",
    "readonly",
    "read-only",
    "disk i/o error",
    "database or disk is full",
    "file is too large",
    "permission",
)


def _damaged(path: Path, cause) -> str:
    reason = getattr(cause, "orig", None) or cause
    if any(text in str(reason).lower() for text in _STORAGE_ERRORS):
        return (
            f"cannot use {path / DATABASE_FILE} ({reason}): the storage is read-only, full, "
            "failing, or limits file sizes, or you lack permission; the index itself may be "
            "intact (`simsearch verify` once that is fixed)"
        )
    return (
        f"{path / DATABASE_FILE} is damaged ({reason}); it cannot be repaired: restore it "
        "from a backup, or index into a new --index"
    )


def _create_database(path: Path, manifest) -> None:
    """Write a new database holding `manifest`, and manifest.json beside it, atomically."""
    # Build the database under a temporary name and rename it into place, so a crash never
    # leaves a half-made index that later runs would trip over.
    with replaced_atomically(path / DATABASE_FILE) as tmp:
        store = Store(tmp, create=True)
        store.set_manifest(manifest)
        store.close()
    _write_atomic(path / MANIFEST_FILE, manifest.to_json() + "\n")


def _write_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
