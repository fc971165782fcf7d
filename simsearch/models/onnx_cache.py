"""The ONNX exports that `--backend auto` (and `--backend onnx` with a transformers model)
embeds with: made once per model, kept in simsearch's cache, found again by the weights.

An entry is what `simsearch export-model` writes (export_model: validated against PyTorch on
real photographs, built in a temporary folder and renamed into place), in a folder named by
the model's weights and config hashes, its layer and pooling, and the export's opset and
format: a model copied or moved elsewhere finds its export again, and another model (even
one at the same path) never takes it. One process exports at a time per entry (a lock file
beside it): a second waits and then uses the first one's export. An export that fails
validation is recorded beside the entry (`<entry>.failed.json`, with the versions that
made it), so the next new index goes straight to torch with the same notice instead of
exporting again; a new simsearch, torch or onnxruntime tries again.

The cache lives in $SIMSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/simsearch, else
~/.cache/simsearch, under onnx/. Not beside the model: a model folder is the user's (or
the Hugging Face cache's, or read-only), and simsearch writes only where it owns the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from simsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_OPSET
from simsearch.errors import ModelExportError, ModelLoadError, first_line
from simsearch.fs.files import replaced_atomically
from simsearch.models.hub import resolve_model
from simsearch.models.onnx import ONNX_EXPORT_FORMAT, ONNX_INFO_FILE, read_export_info
from simsearch.models.weights import hash_config, hash_weights

log = logging.getLogger(__name__)

CACHE_ENV = "SIMSEARCH_CACHE_DIR"

# What making an export needs beyond onnxruntime: the exporter's onnx package, torch, and
# real photographs to validate it on (scikit-image ships them).
EXPORT_MODULES = ("onnxruntime", "onnx", "torch", "skimage")
AUTO_HINT = "pip install 'simsearch[onnx-export]'"


def cache_root() -> Path:
    """The folder simsearch caches in: $SIMSEARCH_CACHE_DIR, else the XDG cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "simsearch"


def missing_for_export() -> list[str]:
    """The modules (of EXPORT_MODULES) that are not installed, without importing any."""
    return [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]


def is_export(model: str | os.PathLike) -> bool:
    """True when `model` is a folder that an ONNX export wrote (it has simsearch_onnx.json)."""
    return (Path(model).expanduser() / ONNX_INFO_FILE).is_file()


def entry_name(folder: Path, layer: int, pool: str, opset: int = DEFAULT_OPSET) -> str:
    """The cache entry's name for model `folder` at `layer` and `pool`: its identity (the
    hashes an index records, and its preprocessor_config.json's: the export records the
    preprocessing it was validated with) and what the export bakes in. A negative `layer`
    is resolved with config.json's num_hidden_layers, so that -1 and the last layer's
    number (as an index's manifest records it) find one entry."""
    weights = hash_weights(folder)
    config = hash_config(folder) or "noconfig"
    try:
        preprocessing = sha256((folder / "preprocessor_config.json").read_bytes())
    except OSError:
        preprocessing = "none"
    if layer < 0:
        try:
            count = json.loads((folder / "config.json").read_bytes()).get("num_hidden_layers")
        except (OSError, ValueError, AttributeError):
            count = None
        if isinstance(count, int) and count + 1 + layer >= 0:
            layer = count + 1 + layer
    identity = f"{weights[:24]}-{config[:12]}-{preprocessing[:12]}"
    return f"{identity}-layer{layer}-{pool}-opset{opset}-v{ONNX_EXPORT_FORMAT}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_export(
    model: str | os.PathLike,
    layer: int = -1,
    pool: str = "cls",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Path:
    """Return the folder of `model`'s ONNX export for `layer` and `pool`, exporting it the
    first time (ModelExportError when it cannot be made or did not validate; ModelLoadError
    when `model` cannot be found, or a cached entry does not check)."""
    folder, _ = resolve_model(str(model))
    root = cache_root() / "onnx"
    name = entry_name(folder, layer, pool)
    entry = root / name
    failed = root / f"{name}.failed.json"
    if entry.is_dir():  # the common case, without taking the lock
        return _checked(entry, folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelExportError(f"cannot make the ONNX cache {root}: {exc.strerror}") from None
    with _locked(root / f"{name}.lock", model):
        if entry.is_dir():  # another process exported it while this one waited
            return _checked(entry, folder)
        reason = _recorded_failure(failed)
        if reason is not None:
            raise ModelExportError(f"{reason} (recorded in {failed})")
        log.warning(
            "exporting %s to ONNX once, for the faster ONNX Runtime path (validated against "
            "PyTorch; later runs reuse it from %s)",
            model,
            root,
        )
        start = time.perf_counter()
        try:
            result = _export(folder, entry, layer, pool, batch_size)
        except OSError as exc:  # the disk, not the model: the next run tries again
            raise ModelExportError(f"cannot write the ONNX export in {root}: {exc}") from None
        except ModelExportError as exc:
            if exc.param != "output":  # the model does not export or validate: remembered
                _record_failure(failed, exc)
            raise
        log.warning(
            "exported in %.0f s: lowest cosine to PyTorch %.7f on %s",
            time.perf_counter() - start,
            result.fp32_min_cosine,
            result.validated_on,
        )
    return _checked(entry, folder)


def _export(folder: Path, entry: Path, layer: int, pool: str, batch_size: int):
    from tqdm import tqdm

    from simsearch.models.onnx_export import export_model

    with tqdm(
        desc="exporting to ONNX", unit="img", file=sys.stderr, disable=None, leave=False
    ) as bar:
        return export_model(folder, entry, layer=layer, pool=pool, batch_size=batch_size,
                            progress=bar)  # fmt: skip


def _checked(entry: Path, folder: Path) -> Path:
    """Return `entry` when it is an export of the model in `folder`; ModelLoadError if not.
    (OnnxEmbedder checks its files' sizes and hashes when it opens them.)"""
    info = read_export_info(entry)
    source = info.get("source") or {}
    student = info.get("student")
    if isinstance(student, dict):  # a student's export: the source is its teacher's space
        same = student.get("weights_sha256") == hash_weights(folder)
    else:
        same = (source.get("weights_sha256"), source.get("config_sha256")) == (
            hash_weights(folder),
            hash_config(folder),
        )
    if not same:
        raise ModelLoadError(
            f"the cached ONNX export {entry} was made from other weights or config than "
            f"{folder}: it "
            "was changed; delete it and the next run exports the model again",
            path=entry,
        )
    return entry


@contextlib.contextmanager
def _locked(path: Path, model):
    """Hold an exclusive lock on `path` (created if needed), telling the user when another
    process holds it (it is exporting the same model)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another simsearch is exporting %s to ONNX; waiting for it", model)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from simsearch._version import __version__

    found: dict[str, str | None] = {"simsearch": __version__}
    for package in ("torch", "onnxruntime", "onnx", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _recorded_failure(path: Path) -> str | None:
    """The reason recorded by an earlier failed export, while the versions are the same."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("versions") != _versions():
        return None
    reason = record.get("reason")
    return reason if isinstance(reason, str) else None


def _record_failure(path: Path, exc: ModelExportError) -> None:
    record = {"reason": first_line(exc), "versions": _versions()}
    try:
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        log.debug("cannot record the failed export in %s: %s", path, error)
