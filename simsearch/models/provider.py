"""ModelProvider: an index's model, chosen by backend, loaded on first use, checked against
the index's manifest.

The backend (torch or ONNX Runtime) is a setting of its own; an index built with one keeps
using it unless told otherwise. The model itself loads only when something needs it, and
torch and onnxruntime only with it, so opening an index to search by id never loads them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.errors import ImageError, LayerError, ModelExportError, ModelLoadError, QueryError
from simsearch.media.decode import decode_image, read_image_file, to_rgb
from simsearch.media.objects import is_url, read_object
from simsearch.media.preprocess import Preprocessing
from simsearch.models import embed
from simsearch.models.embed import (
    PRECISIONS,
    Embedder,
    check_student_request,
    default_pool,
    resolve_layer,
)
from simsearch.models.hub import recorded_name, resolve_model
from simsearch.models.onnx import OnnxEmbedder, read_export_info
from simsearch.models.onnx_cache import AUTO_HINT, cached_export, is_export, missing_for_export
from simsearch.models.protocol import ImageEmbedder, PixelEmbedder
from simsearch.models.student import (
    input_preprocessing,
    is_student,
    read_student,
    student_image_size,
)
from simsearch.models.weights import hash_config, hash_weights
from simsearch.storage.checks import check_vectors
from simsearch.storage.manifest import Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")

# The precisions `auto` may take the ONNX Runtime path for: it runs the model in fp32, the
# fastest faithful arithmetic on a CPU (docs/benchmarks.md); one asked for by name
# (bf16, fp16, int8) is torch's.
AUTO_ONNX_PRECISIONS = (None, "auto", "fp32")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def backend_of(manifest: Manifest) -> str:
    """Return the backend an index was built with: its precision says (onnx-fp32, ...)."""
    return "onnx" if manifest.precision.startswith("onnx-") else "torch"


def new_embedder(model, layer, pool, device, precision, batch_size, backend: str):
    """Load an embedder for a new index: `layer` None is the last, `pool` None "cls".
    `backend` "auto": ONNX Runtime when it can run here (auto_backend), else torch."""
    if backend == "auto":
        backend = auto_backend(model, device, precision)
        if backend == "onnx":
            try:
                return onnx_embedder(model, layer, pool, device, precision, batch_size)
            except (ModelExportError, ModelLoadError) as exc:
                # The faster path, not the only one: torch embeds the same model (and says
                # so itself if the model cannot be found at all).
                log.warning("%s; embedding with torch instead", exc)
                backend = "torch"
    if backend == "onnx":
        return onnx_embedder(model, layer, pool, device, precision, batch_size)
    return Embedder(
        model,
        layer=-1 if layer is None else layer,
        pool=pool,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )


def auto_backend(model, device: str, precision: str | None) -> str:
    """What `--backend auto` runs a new index's model with: "onnx" on a CPU, in fp32, where
    onnxruntime is installed and the model can be exported (or is an export); else "torch":
    on a GPU, for a precision asked by name, and on CPUs with AMX when no precision is asked
    (torch's bf16 there is the faster path), with a notice when only the exporter's packages
    are missing."""
    if is_export(model):
        return "onnx"
    if precision not in AUTO_ONNX_PRECISIONS or device == "cuda":
        return "torch"
    if precision in (None, "auto") and embed.cpu_has_amx():
        log.info("AMX: torch's bf16 is this CPU's faster path (ONNX Runtime runs fp32)")
        return "torch"
    missing = missing_for_export()
    if "onnxruntime" in missing:
        return "torch"  # the torch-only install: as before there was a choice
    if missing:
        log.warning(
            "embedding with torch: the faster ONNX Runtime path exports the model once, "
            "which needs %s (%s)",
            ", ".join(missing),
            AUTO_HINT,
        )
        return "torch"
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "torch"  # a GPU: torch in fp16
    return "onnx"


def onnx_embedder(model, layer, pool, device, precision, batch_size, *, model_id=None):
    """Return an OnnxEmbedder for `model`: an export's folder, whose `layer` and `pool` are
    checked against what it baked in, or a transformers model, embedded through its cached
    export (made the first time: models/onnx_cache.py)."""
    if not is_export(model):
        folder = cached_export(
            model,
            -1 if layer is None else layer,
            pool or default_pool(model),
            batch_size=batch_size,
        )
        return OnnxEmbedder(
            folder,
            device=device,
            precision=precision,
            batch_size=batch_size,
            model_id=model_id or _model_id(model),
        )
    embedder = OnnxEmbedder(model, device=device, precision=precision, batch_size=batch_size)
    if layer is not None and resolve_layer(layer, embedder.num_layers) != embedder.layer:
        raise LayerError(
            f"the ONNX export {model} has layer {embedder.layer} baked in, not {layer}; "
            "export the model again with that layer",
            param="layer",
        )
    if pool is not None and pool != embedder.pool:
        raise LayerError(
            f"the ONNX export {model} has {embedder.pool} pooling baked in, not {pool}; "
            "export the model again with that pooling",
            param="pool",
        )
    return embedder


def _model_id(model) -> str:
    """What a manifest names `model` by, as the torch Embedder does."""
    return recorded_name(str(model), *resolve_model(str(model)))


class ModelProvider:
    """The model of one index: `embedder` loads it on first use. `manifest` is a callable
    returning the index's current manifest (it changes when settings are written)."""

    def __init__(
        self,
        manifest: Callable[[], Manifest],
        *,
        model: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int,
        embedder=None,
        backend: str | None = None,
    ) -> None:
        self._manifest = manifest
        self.model = model or manifest().model
        # An index built with ONNX Runtime keeps using it unless told otherwise (its
        # manifest's model is an export's folder, or the model of a cached export).
        if backend in (None, "auto"):  # the index's own, unless the model is an export
            backend = "onnx" if model is not None and is_export(model) else backend_of(manifest())
        self.backend = check_backend(backend)
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.loaded = embedder

    def check_request(self, model, layer: int | None, pool: str | None) -> None:
        """Raise ManifestMismatchError when `model`, `layer` or `pool` (those given) are not
        the index's; `model` is compared by its weights, without loading it."""
        manifest = self._manifest()
        if self.loaded is not None:
            manifest.check_compatible(self.loaded.manifest())
        wanted = manifest
        if layer is not None:
            wanted = dataclasses.replace(wanted, layer=resolve_layer(layer, manifest.num_layers))
        if pool is not None:
            wanted = dataclasses.replace(wanted, pool=pool)
        if model is not None and self.loaded is None and is_export(model):
            # The export records its source weights' hash: checked without loading anything.
            source = read_export_info(model)["source"]
            wanted = dataclasses.replace(
                wanted,
                model=str(model),
                weights_sha256=source["weights_sha256"],
                config_sha256=source.get("config_sha256"),
            )
        elif model is not None and self.loaded is None and is_student(str(model)):
            # A student embeds into its teacher's space: its record (checked against its
            # weights) says which, without loading it.
            student = read_student(resolve_model(str(model))[0])
            check_student_request(student, layer, pool)
            wanted = student.manifest(str(model), manifest.precision)
        elif model is not None and self.loaded is None:
            folder, _ = resolve_model(str(model))
            wanted = dataclasses.replace(
                wanted,
                model=str(model),
                weights_sha256=hash_weights(folder),
                config_sha256=hash_config(folder),
            )
        manifest.check_compatible(wanted)

    @property
    def embedder(self) -> ImageEmbedder:
        """The Embedder for this index's model, loaded on first use and checked against it."""
        if self.loaded is None:
            # An index built with an export's folder names that folder as its model: torch
            # needs the model it was exported from. (One that --backend auto built names
            # the source model, which both backends load.)
            if self.backend == "torch" and is_export(self.model):
                raise ModelLoadError(
                    f"{self.model} is an ONNX export, which the torch backend cannot run: "
                    "give the model it was exported from, or use the onnx backend",
                    param="model",
                )
            embedder = self.spec().load()
            log.info("loaded %s: %s on %s", self.model, embedder.precision, embedder.device)
            student = embedder.manifest().student
            if student:
                log.warning(
                    "embedding with %s, a student of %s (recall@10 %s against it): its "
                    "vectors approximate the teacher's",
                    self.model,
                    student.get("teacher"),
                    student.get("recall_at_10"),
                )
            self.loaded = embedder
        return self.loaded

    def spec(self, device: str | None = None) -> EmbedderSpec:
        """What another process (a Ray worker) needs to load this index's model itself;
        `device` replaces the provider's. With no precision asked for, the worker uses the
        one this index's vectors were made with, not its own hardware's choice: vectors from
        a Ray run are then a local run's."""
        manifest = self._manifest()
        precision = self.precision
        if precision in (None, "auto") and self.backend == "torch":
            made = self.loaded.precision if self.loaded is not None else manifest.precision
            precision = made if made in PRECISIONS else precision
        return EmbedderSpec(
            self.backend,
            str(self.model),
            manifest,
            device or self.device,
            precision,
            self.batch_size,
        )

    def embed(self, images: Sequence) -> np.ndarray:
        """Return one unit-norm float32 row per image (file paths or PIL images); a model
        whose output is not that raises ModelOutputError."""
        embedder = self.embedder
        vectors = embedder.embed_images([as_image(img, embedder.preprocess) for img in images])
        return check_vectors(vectors, self._manifest().dim, f"the model {self.model}")

    def on_demand(self) -> PixelEmbedder:
        """The loaded embedder, or a stand-in that loads it when it first embeds (an index
        run that finds nothing new never pays for the model)."""
        return self.loaded or _ModelOnDemand(self)


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """An index's model as settings: picklable, so a Ray worker loads the same model with
    the same layer, pooling, precision and preprocessing, and checks it against the same
    manifest (its weights' hash) before it embeds anything."""

    backend: str
    model: str
    manifest: Manifest
    device: str
    precision: str | None
    batch_size: int

    def load(self) -> ImageEmbedder:
        """Load the model; ManifestMismatchError when it is not the index's."""
        manifest = self.manifest
        embedder: ImageEmbedder
        try:
            if self.backend == "onnx":
                embedder = onnx_embedder(
                    self.model,
                    manifest.layer,
                    manifest.pool,
                    self.device,
                    self.precision,
                    self.batch_size,
                )
            else:
                embedder = Embedder(
                    self.model,
                    layer=manifest.layer,
                    pool=manifest.pool,
                    device=self.device,
                    precision=self.precision,
                    batch_size=self.batch_size,
                )
        except ModelLoadError as exc:
            if self.model != manifest.model:
                raise
            raise ModelLoadError(
                f"{exc}. This index was built with that model; if it has moved, say where "
                "it is now",
                param="model",
            ) from None
        manifest.check_compatible(embedder.manifest())
        return embedder


def model_input(model, manifest: Manifest) -> Preprocessing:
    """The preprocessing `model`'s input takes in an index with `manifest`: the index's, or
    a student's (of the index's model) that sees smaller images, scaled to its size. Read
    from the student's record or its export's, without loading the model (which checks)."""
    folder = Path(str(model)).expanduser()
    side = None
    if is_student(folder):
        side = student_image_size(folder)
    elif is_export(folder):
        try:
            summary = read_export_info(folder).get("student")
        except ModelLoadError:
            summary = None
        side = summary.get("image_size") if isinstance(summary, dict) else None
    try:
        return input_preprocessing(manifest.preprocessing, {"image_size": side} if side else None)
    except (ValueError, TypeError):
        return Preprocessing.from_dict(manifest.preprocessing)  # loading says what is wrong


class _ModelOnDemand:
    """What ingest needs of an Embedder, loading the index's model only when it is used."""

    def __init__(self, provider: ModelProvider) -> None:
        self._provider = provider
        self.batch_size = provider.batch_size
        # The manifest's preprocessing is the model's (a student's scaled to its size): the
        # check on loading guarantees it, and embed_pixels checks the loaded model's.
        self.preprocess = model_input(provider.model, provider._manifest())

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        embedder = self._provider.embedder
        if embedder.preprocess != self.preprocess:
            raise ModelLoadError(
                f"the model {self._provider.model} takes other input than its record said "
                "when the run started; run again",
                param="model",
            )
        vectors = embedder.embed_pixels(pixels)
        dim = self._provider._manifest().dim
        return check_vectors(vectors, dim, f"the model {self._provider.model}")


def as_image(image, preprocess):
    """Return a PIL RGB image for a path (decoded as indexing decodes it) or a PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if is_url(image):
        try:
            return decode_image(read_object(image), draft=preprocess, name=image)
        except ImageError as exc:
            raise QueryError(f"{image}: {exc}") from None
    path = Path(image)
    if not path.exists():
        hint = f" (to search with indexed image {image}, write id:{image})"
        raise QueryError(f"no such image file: {path}{hint if str(image).isdigit() else ''}")
    try:
        return decode_image(read_image_file(path), draft=preprocess, name=path)
    except ImageError as exc:
        raise QueryError(f"{path}: {exc}") from None
