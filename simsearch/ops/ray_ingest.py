"""The index run's read, decode and embed stages on a Ray cluster (`simsearch index --ray`).

The driver (this process) lists the folders and sorts out what changed exactly as a local
run does (ops.scan): unchanged files never leave it. The files to read become a Ray Data
pipeline:

- CPU tasks read each file (a local path on storage every node sees, or an object-store
  URL), hash it and, when its content is new, decode and preprocess it with the same reader
  and bounds as a local run (ops.prepare). Content the index holds already (a renamed or
  copied file) is hashed there but never decoded or embedded.
- An actor pool embeds the decoded pixels: one model per actor, loaded from the index's
  model settings (models.provider.EmbedderSpec) and checked against the index's manifest
  (its weights' hash) before it embeds anything; on GPUs when asked.
- The results stream back to the driver, which routes and commits them in batches as a
  local run does (ops.ingest, ops.writer): the single writer, so a killed driver loses no
  committed work and a rerun embeds nothing committed again.

Ray retries the tasks of a worker that dies (and restarts its actors); a file whose result
arrives twice is taken once. Vectors are checked (finite, dimension, unit norm) on the
driver before they are committed, as a local model's are.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simsearch.errors import RayError, first_line
from simsearch.fs.faults import ONCE_ENV, crash_once
from simsearch.media.preprocess import Preprocessing
from simsearch.models.provider import EmbedderSpec, model_input
from simsearch.ops.prepare import Prepared, prepare
from simsearch.storage.checks import check_vectors

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'simsearch[ray]'"
FAULT_ENVS = (ONCE_ENV,)
OBJECT_STORE_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")

# Retries are Ray Data's defaults: a read task whose worker died is run again (the tasks
# are pure: a retry reads the file again), an actor that died is restarted and its batch
# given to it again, without limit.


@dataclass(frozen=True)
class RaySettings:
    """Where and how a Ray run embeds.

    `address`: the cluster ("auto", "HOST:6379", "ray://HOST:10001"); None: what ray.init()
    finds by itself (RAY_ADDRESS, a cluster started on this machine with `ray start`), else
    a cluster of this machine alone, started for the run. `workers`: embedding actors (one
    model each); `gpus_per_worker`: GPUs each actor asks Ray for (0: it embeds on CPUs);
    `cpus_per_worker`: CPUs each actor reserves.
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


def embedded_on_ray(
    todo: Sequence[tuple],
    spec: EmbedderSpec,
    hashes: dict[str, int],
    max_pixels: int,
    settings: RaySettings,
) -> Iterator[Prepared]:
    """Yield a Prepared for every file of `todo` (ops.scan's ToRead tuples), embedded on the
    cluster: `vector` set for new content, `known_id` for content in `hashes`, `error` for a
    file that could not be read or decoded. In the order results arrive, each file once.
    The workers read paths (which every node must see) and object URLs as a local run does.
    """
    ray = _import_ray()
    started = _connect(ray, settings)
    try:
        yield from _run(ray, todo, spec, hashes, max_pixels, settings)
    finally:
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayError(
            f"a Ray run needs Ray Data, which is not installed: {INSTALL_HINT}", param="ray"
        ) from None
    return ray


def _connect(ray, settings: RaySettings) -> bool:
    """Connect to the cluster unless this process is connected already; True when this
    call started the connection (and so ends it)."""
    if ray.is_initialized():
        return False
    _check_reachable(settings.address)
    # Where the objects are (not who may read them: the nodes have their own credentials)
    # and the test hooks (fs.faults) go to the workers with the job's environment.
    hooks = {k: v for k, v in os.environ.items() if k in FAULT_ENVS + OBJECT_STORE_ENVS}
    try:
        ray.init(
            address=settings.address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": hooks} if hooks else None,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = settings.address or "the local machine"
        why = first_line(exc)
        if settings.address and not os.environ.get("RAY_AUTH_MODE"):
            # The port answered (_check_reachable): most often the cluster wants a token,
            # which Ray sends only when told to.
            why += (
                ". It answers, so it may want a token (clusters of Ray 2.59 and later do): "
                "set RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN or "
                "~/.ray/auth_token"
            )
        raise RayError(
            f"cannot connect to the Ray cluster at {where}: {why}", param="ray", fix="start-ray"
        ) from None
    return True


# Seconds to wait for a cluster's port to answer before saying it cannot be reached (Ray
# itself retries for minutes).
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str | None) -> None:
    """Raise RayError unless the HOST:PORT of `address` accepts a connection; addresses
    without a port ("auto", "local") are left to Ray."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayError(
            f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}",
            param="ray",
            fix="start-ray",
        ) from None


def _run(ray, todo, spec, hashes, max_pixels, settings) -> Iterator[Prepared]:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run has its own (tqdm on the driver)
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    items = []
    for i, (real, key, size, mtime_ns, device, error) in enumerate(todo):
        if error is not None:  # could not be listed or opened: recorded, never sent
            yield Prepared(real, key, size, mtime_ns, device, error=error)
        else:
            items.append({"i": i, "path": real})
    if not items:
        return
    _check_resources(ray.cluster_resources(), settings)
    # The content the index holds, as sorted 32-byte digests: one object every read task
    # shares, instead of a copy of a dict in each.
    known = ray.put(np.sort(np.array([bytes.fromhex(h) for h in hashes], dtype="S32")))
    batch = spec.batch_size
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch)))
    ds = ds.map_batches(
        _read_batch,
        batch_size=batch,
        fn_kwargs=dict(
            preprocessing=model_input(spec.model, spec.manifest).to_dict(),
            known=[known],  # in a list: Ray hands a top-level ObjectRef over resolved
            max_pixels=max_pixels,
        ),
        num_cpus=1,
    )
    ds = ds.map_batches(
        _EmbedWorker,
        batch_size=batch,
        fn_constructor_kwargs=dict(spec=spec),
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        num_cpus=settings.cpus_per_worker,
        num_gpus=settings.gpus_per_worker or None,
    )
    seen: set[int] = set()
    dim = spec.manifest.dim
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        embedded = out["embedded"].astype(bool)
        if embedded.any():
            check_vectors(out["vector"][embedded], dim, f"the Ray workers' model {spec.model}")
        for j in range(len(out["i"])):
            i = int(out["i"][j])
            if i in seen:  # a retried block's result, already taken
                continue
            seen.add(i)
            yield _prepared(todo[i], out, j, bool(embedded[j]), hashes)
    for item in items:  # never silently lost: a file without a result is recorded
        if item["i"] not in seen:
            real, key, size, mtime_ns, device, _ = todo[item["i"]]
            error = "no result from the Ray workers (index it again)"
            yield Prepared(real, key, size, mtime_ns, device, error=error)


def _check_resources(have: dict, settings: RaySettings) -> None:
    """Refuse settings the cluster cannot run: actors that would take every CPU leave none
    for the read tasks, and the run would wait for ever."""
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    wanted = settings.workers * settings.cpus_per_worker
    if wanted >= cpus:
        raise RayError(
            f"{settings.workers} embedding workers of {settings.cpus_per_worker:g} CPUs each "
            f"take all {cpus:g} CPUs of the Ray cluster, leaving none to read images: use "
            "fewer workers, fewer CPUs each, or a larger cluster",
            param="ray_workers",
        )
    if settings.workers * settings.gpus_per_worker > gpus:
        raise RayError(
            f"{settings.workers} embedding workers of {settings.gpus_per_worker:g} GPUs each "
            f"need {settings.workers * settings.gpus_per_worker:g} GPUs; the Ray cluster has "
            f"{gpus:g}: use fewer workers or fewer GPUs each",
            param="ray_gpus_per_worker",
        )


def _prepared(entry: tuple, out: dict[str, np.ndarray], j: int, embedded: bool, hashes):
    real, key, size, mtime_ns, device, _ = entry
    item = Prepared(real, key, size, mtime_ns, device)
    item.seconds = float(out["seconds"][j])
    if out["error"][j]:
        item.error = str(out["error"][j])
        return item
    item.sha256 = str(out["sha256"][j])
    item.size = int(out["size"][j])
    item.width, item.height = int(out["width"][j]), int(out["height"][j])
    item.format = str(out["format"][j]) or None
    lossless = int(out["lossless"][j])
    item.lossless = None if lossless < 0 else bool(lossless)
    item.known_id = hashes.get(item.sha256)
    if embedded:
        item.vector = np.asarray(out["vector"][j], dtype=np.float32)
    elif item.known_id is None:
        # Taken for known by a worker but not by the driver: cannot happen while the
        # driver's content only grows; were it to, the file is recorded, not lost.
        item.error = "not embedded by the Ray workers (index it again)"
    return item


# -- on the workers ---------------------------------------------------------------------------

_known_cache: dict[Any, np.ndarray] = {}


def _read_batch(
    batch: dict[str, np.ndarray],
    *,
    preprocessing: dict,
    known: list,
    max_pixels: int,
) -> dict[str, np.ndarray]:
    """A read task: read, hash, decode and preprocess a batch of files (ops.prepare)."""
    import ray

    ref = known[0]
    digests = _known_cache.get(ref)
    if digests is None:
        _known_cache.clear()
        digests = _known_cache[ref] = ray.get(ref)
    preprocess = Preprocessing.from_dict(preprocessing)
    known_here = _KnownContent(digests)
    rows = [
        prepare(str(path), str(path), -1, -1, None, None, preprocess, known_here, max_pixels)
        for path in batch["path"]
    ]
    shape = next((r.pixels.shape for r in rows if r.pixels is not None), None)
    out = {
        "i": batch["i"],
        "sha256": np.array([r.sha256 or "" for r in rows], dtype=object),
        "size": np.array([r.size for r in rows], dtype=np.int64),
        "width": np.array([r.width for r in rows], dtype=np.int64),
        "height": np.array([r.height for r in rows], dtype=np.int64),
        "format": np.array([r.format or "" for r in rows], dtype=object),
        "lossless": np.array([-1 if r.lossless is None else int(r.lossless) for r in rows]),
        "error": np.array([r.error or "" for r in rows], dtype=object),
        "seconds": np.array([r.seconds for r in rows], dtype=np.float64),
        "decoded": np.array([r.pixels is not None for r in rows]),
    }
    # Rows that were not decoded (failed, or content known) carry zeros of the same shape.
    pixels = np.zeros((len(rows), *(shape or (0,))), dtype=np.float32)
    for n, r in enumerate(rows):
        if r.pixels is not None:
            pixels[n] = r.pixels
    out["pixels"] = pixels
    return out


class _KnownContent(Mapping[str, int]):
    """Content the index holds, from sorted 32-byte digests, as the mapping prepare() asks
    (sha256 -> an id; -1 here: the worker needs only to know it is known)."""

    def __init__(self, digests: np.ndarray) -> None:
        self._digests = digests

    def __getitem__(self, sha256: str) -> int:
        key = np.array(bytes.fromhex(sha256), dtype="S32")
        at = int(np.searchsorted(self._digests, key))
        if at < len(self._digests) and self._digests[at] == key:
            return -1
        raise KeyError(sha256)

    def __iter__(self):
        return (bytes(d).ljust(32, b"\0").hex() for d in self._digests)  # S32 drops trailing NULs

    def __len__(self) -> int:
        return len(self._digests)


class _EmbedWorker:
    """An embedding actor: the index's model, loaded once, checked against its manifest."""

    def __init__(self, spec: EmbedderSpec) -> None:
        self._embedder = spec.load()
        self._dim = spec.manifest.dim
        log.info("Ray worker %d loaded %s on %s", os.getpid(), spec.model, spec.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crash_once("ray-embed")
        decoded = batch.pop("decoded").astype(bool)
        pixels = batch.pop("pixels")
        vectors = np.zeros((len(decoded), self._dim), dtype=np.float32)
        if decoded.any():
            vectors[decoded] = self._embedder.embed_pixels(pixels[decoded])
        batch["vector"] = vectors
        batch["embedded"] = decoded
        return batch
