"""What one `simsearch serve` process holds: the index open for reading, the model loaded
once and shared (queries batched through it, the background index run using it too), the
thumbnails made so far, the background run and the metrics. The HTTP layer (app.py) is a
thin translation of requests into calls here."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.api import Index
from simsearch.config import DEFAULT_BATCH_SIZE
from simsearch.errors import QueryError, SimsearchError
from simsearch.media.thumbnail import THUMBNAIL_PX, thumbnail_jpeg
from simsearch.records import DuplicateGroup, Hit
from simsearch.server.batching import DEFAULT_WINDOW_S, EmbedBatcher
from simsearch.server.jobs import IndexJob
from simsearch.server.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 20 * 2**20  # bytes a request may send: a large camera JPEG fits
# Thumbnails kept in memory, by their total bytes: a 256 px JPEG is 10-25 KB, so about
# 3,000 of them, a few pages of results for many clients.
THUMBNAIL_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Settings:
    index: Path
    host: str = "127.0.0.1"
    model: str | None = None
    device: str = "auto"
    precision: str | None = None
    backend: str | None = None
    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD
    cors: tuple[str, ...] = ()
    move_to: Path | None = None  # where duplicates are moved; None: moving is off
    window: float = DEFAULT_WINDOW_S
    preload: bool = True  # load the model at start, in the background


class SharedEmbedder:
    """An index's loaded model behind a lock: the query batcher and the background index
    run take turns, batch by batch, on one copy of the weights."""

    def __init__(self, embedder, lock: threading.Lock) -> None:
        self._embedder = embedder
        self.lock = lock
        self.batch_size = embedder.batch_size
        self.preprocess = embedder.preprocess
        self.device = embedder.device
        self.precision = embedder.precision

    def manifest(self):
        return self._embedder.manifest()

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            return self._embedder.embed_pixels(pixels)

    def embed_images(self, images) -> np.ndarray:
        with self.lock:
            return self._embedder.embed_images(images)


class Thumbnails:
    """JPEG thumbnails by (id, size, file mtime), least recently used dropped past a
    byte budget; each is made once while it stays."""

    def __init__(self, budget: int = THUMBNAIL_CACHE_BYTES) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._budget = budget

    def get(self, key: tuple, path: str, size: int, mtime_ns: int | None = None) -> bytes:
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        jpeg, _, _ = thumbnail_jpeg(path, size, mtime_ns=mtime_ns)
        with self._lock:
            if key not in self._kept:
                self._kept[key] = jpeg
                self._bytes += len(jpeg)
            while self._bytes > self._budget and self._kept:
                _, dropped = self._kept.popitem(last=False)
                self._bytes -= len(dropped)
        return jpeg


class Server:
    """The state behind the HTTP API; every method may be called from any thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index = Index.open(
            settings.index, model=settings.model, device=settings.device,
            precision=settings.precision, backend=settings.backend,
        )  # fmt: skip
        self.lock = threading.RLock()  # the reader index, one request at a time
        self.model_lock = threading.Lock()
        self.model_ready = threading.Event()
        self.model_error: str | None = None
        self.shared: SharedEmbedder | None = None
        self.metrics = Metrics(self._gauges)
        self.batcher = EmbedBatcher(
            self._embed_now, max_batch=DEFAULT_BATCH_SIZE, window=settings.window,
            on_batch=self.metrics.batch,
        )  # fmt: skip
        self.thumbnails = Thumbnails()
        self.job = IndexJob()
        self._duplicates: tuple[tuple, list[DuplicateGroup]] | None = None
        if settings.preload:
            threading.Thread(target=self.load_model, name="simsearch-load", daemon=True).start()

    # -- the model -------------------------------------------------------------------------

    def load_model(self) -> SharedEmbedder:
        """Load the index's model once (the first caller does; the others wait)."""
        with self.model_lock:
            if self.shared is None and self.model_error is None:
                try:
                    self.shared = SharedEmbedder(self.index.embedder, threading.Lock())
                except SimsearchError as exc:
                    self.model_error = str(exc)
                    log.error("cannot load the model: %s", exc)
                finally:
                    self.model_ready.set()
        if self.shared is None:
            raise QueryError(f"the model could not be loaded: {self.model_error}")
        return self.shared

    @contextlib.contextmanager
    def model_turn(self) -> Iterator[None]:
        """Hold the model for a call that reaches it through the reader index itself
        (calibration), so that it never runs at once with the batcher or the index run."""
        shared = self.load_model()
        with shared.lock:
            yield

    def _embed_now(self, images: Sequence) -> np.ndarray:
        return self.load_model().embed_images(images)

    def embed(self, images: Sequence) -> np.ndarray:
        """Unit vectors of PIL images, batched with other requests' images."""
        return self.batcher.embed(images)

    # -- searching -------------------------------------------------------------------------

    def stored_vectors(self, ids: Sequence[int]) -> np.ndarray:
        with self.lock:
            found = self.index.store.vectors_by_id([int(i) for i in ids])
        missing = [i for i in ids if int(i) not in found]
        if missing:
            raise QueryError(f"no indexed image has id {missing[0]}", param="ids")
        return np.stack([found[int(i)] for i in ids]).astype(np.float32)

    def search(self, vectors: np.ndarray, k: int, **params) -> list[list[Hit]]:
        with self.lock:
            return self.index.search_many(list(vectors), k, **params)

    def describe(self, hits: Sequence[Hit]) -> list[dict]:
        """Hits with what a result grid shows: file size, pixel size, labels, cluster."""
        ids = [h.id for h in hits]
        with self.lock:
            store = self.index.store
            facts = store.image_facts(ids)
            labels = store.labels_of(ids)
            clusters = store.clusters_of(ids)
        out = []
        for hit in hits:
            _, width, height, size, _ = facts.get(hit.id, (None, None, None, None, None))
            out.append(
                {
                    **dataclasses.asdict(hit),
                    "size": size,
                    "width": width,
                    "height": height,
                    "labels": [dataclasses.asdict(label) for label in labels.get(hit.id, [])],
                    "cluster": clusters[hit.id][0] if hit.id in clusters else None,
                }
            )
        return out

    def image_path(self, image_id: int) -> tuple[str, int]:
        """The stored path and mtime of an indexed id (never a path from a request)."""
        with self.lock:
            facts = self.index.store.image_facts([image_id])
        if image_id not in facts:
            raise QueryError(f"no indexed image has id {image_id}", param="id")
        path, _, _, _, mtime_ns = facts[image_id]
        return path, mtime_ns

    def thumbnail(self, image_id: int, size: int = THUMBNAIL_PX) -> bytes:
        path, mtime_ns = self.image_path(image_id)
        # The file opened must have the indexed mtime: a file swapped for a link to any
        # other readable file since (~/.ssh/id_rsa) is refused, checked on the open file.
        return self.thumbnails.get((image_id, size, mtime_ns), path, size, mtime_ns)

    # -- duplicates ------------------------------------------------------------------------

    def threshold(self, given: float | None) -> float:
        if given is not None:
            return given
        with self.lock:
            stored = self.index.manifest.dedup_calibration
        if stored is None:
            raise QueryError("this index has no calibrated dedup threshold", fix="calibrate")
        return float(stored["threshold"])

    def duplicate_groups(self, threshold: float) -> list[DuplicateGroup]:
        """The groups at `threshold`, computed once per state of the index."""
        with self.lock:
            key = (self.index.store.generation(), threshold)
            if self._duplicates is None or self._duplicates[0] != key:
                self._duplicates = (key, self.index.duplicates(threshold))
            return self._duplicates[1]

    def manifests(self) -> list[Path]:
        folder = self.settings.move_to
        if folder is None or not folder.is_dir():
            return []
        return sorted(folder.glob("simsearch-moves-*.jsonl"), reverse=True)

    def manifest_named(self, name: str) -> Path:
        """A manifest of this server's move folder, by its name alone."""
        for path in self.manifests():
            if path.name == name:
                return path
        raise QueryError(f"no manifest of moved duplicates is named {name!r}", param="manifest")

    def move_folder(self) -> Path:
        if self.settings.move_to is None:
            raise QueryError(
                "moving duplicates is off: the server was started without a folder to move them to",
                param="move_to",
            )
        return self.settings.move_to

    # -- the background index run ----------------------------------------------------------

    def start_index_run(self) -> bool:
        """Start `add` over the index's folders in the background; False if one runs."""
        with self.lock:
            roots = self.index.roots()
        if not roots:
            raise QueryError("this index records no folders to index (index them once first)")
        shared = self.load_model()

        def run(progress):
            with Index.open(self.settings.index, embedder=shared) as writer:
                return writer.add(roots, progress=progress)

        return self.job.start(run)

    # -- serving ---------------------------------------------------------------------------

    def _gauges(self) -> dict[str, float]:
        try:
            with self.lock:
                indexed, failed = self.index.store.counts()
        except SimsearchError:
            return {}
        return {"index_images": indexed, "index_failed": failed, "model_loaded": bool(self.shared)}

    def close(self) -> None:
        self.batcher.close()
        self.job.join(timeout=30)
        with self.lock:
            self.index.close()
