"""IndexParts: what an operation works on, the pieces one open index is made of.

`Index` (api.py) holds one and delegates each method to a function of `ops` taking it; the
functions never see `Index`, so the layers stay one-way and a test can build the parts it
needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import IndexExistsError
from simsearch.models.provider import ModelProvider, backend_of, check_backend, new_embedder
from simsearch.search.cache import VectorCache
from simsearch.search.plan import try_index_type
from simsearch.storage.folder import IndexFolder
from simsearch.storage.manifest import DATABASE_FILE, Manifest
from simsearch.storage.store import Store


@dataclass
class IndexParts:
    folder: IndexFolder
    cache: VectorCache
    models: ModelProvider

    @classmethod
    def of(cls, folder: IndexFolder, models: ModelProvider) -> IndexParts:
        cache = VectorCache(
            folder.path,
            folder.store,
            folder.manifest.dim,
            folder.lock,
            lambda: folder.manifest.index_type,
        )
        folder.on_write.append(cache.begin_write)
        return cls(folder, cache, models)

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def store(self) -> Store:
        return self.folder.store

    @property
    def manifest(self) -> Manifest:
        return self.folder.manifest

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """The write session: the lock held, a crash's leftovers tidied (IndexFolder)."""
        return self.folder.writing()

    def set_manifest(self, manifest: Manifest) -> None:
        self.folder.set_manifest(manifest)


def create_parts(
    path: Path,
    model,
    *,
    layer: int | None,
    pool: str | None,
    device: str,
    precision: str | None,
    batch_size: int,
    embedder,
    index_type: str,
    backend: str,
) -> IndexParts:
    """Make a new index folder for `model` (or `embedder`) and return its parts."""
    backend = check_backend(backend)
    if (path / DATABASE_FILE).exists():
        raise IndexExistsError(f"an index already exists at {path}; open it instead")
    if embedder is None:  # "auto" becomes the backend it chose
        embedder = new_embedder(model, layer, pool, device, precision, batch_size, backend)
    backend = backend_of(embedder.manifest())  # what a later open will use
    manifest = dataclasses.replace(embedder.manifest(), index_type=index_type.strip())
    try_index_type(manifest.index_type, manifest.dim)  # IndexTypeError if it is unusable
    folder = IndexFolder.create(path, manifest)
    models = ModelProvider(
        lambda: folder.manifest,
        device=device,
        precision=precision,
        batch_size=batch_size,
        embedder=embedder,
        backend=backend,
    )
    return IndexParts.of(folder, models)


def open_parts(
    path: Path,
    *,
    model,
    layer: int | None,
    pool: str | None,
    device: str,
    precision: str | None,
    batch_size: int,
    embedder,
    backend: str | None,
) -> IndexParts:
    """Open an index folder, check the model settings asked for against it, return its parts."""
    folder = IndexFolder.open(Path(path))
    try:
        models = ModelProvider(
            lambda: folder.manifest,
            model=None if model is None else str(model),
            device=device,
            precision=precision,
            batch_size=batch_size,
            embedder=embedder,
            backend=backend,
        )
        models.check_request(model, layer, pool)
    except BaseException:
        folder.close()
        raise
    return IndexParts.of(folder, models)
