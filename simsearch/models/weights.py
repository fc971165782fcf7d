"""A model folder's weight files: which ones, their identity (the hashes an index records to
know its model again), and how many values they hold, read from safetensors headers alone.

Nothing here imports torch or transformers; hub checks a config against these counts before
anything is allocated (check_size).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from simsearch.errors import ModelLoadError

# Weight files, in the order we prefer them: safetensors cannot run code when loaded.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def weight_files(folder: Path) -> list[Path]:
    """Return the weight files of model `folder`, of the first WEIGHT_PATTERNS kind it has."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


# Weight hashes already computed in this process, keyed by the files' paths, sizes and mtimes:
# hashing ViT-L's 1.2 GB takes about a second, and opening an index with --model and then
# loading that model would otherwise do it twice.
_HASHES: dict[tuple, str] = {}


def hash_weights(folder: Path) -> str:
    """Return the SHA-256 over the model's weight files (name and content, in name order)."""
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model.bin) in {folder}")
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        _HASHES[key] = _sha256_files(files)
    return _HASHES[key]


# config.json fields that do not change what the model computes: names, bookkeeping, the
# class names of a head (the embedding path is the same), the dtype it was saved in.
CONFIG_IDENTITY_IGNORED = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "id2label",
        "label2id",
        "torch_dtype",
        "dtype",
        "problem_type",
        "finetuning_task",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def hash_config(folder: Path) -> str | None:
    """Return the SHA-256 of what config.json in `folder` says the model computes (every
    field but CONFIG_IDENTITY_IGNORED, canonically written), or None without a readable
    config: the same weights under another activation or layer-norm epsilon give other
    vectors, and are another model."""
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None

    def kept(value):
        if isinstance(value, dict):
            return {k: kept(v) for k, v in value.items() if k not in CONFIG_IDENTITY_IGNORED}
        return value

    text = json.dumps(kept(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# A safetensors file starts with the length of its JSON header; a length above this (the
# safetensors library's own limit) is not a header, and is not read into memory.
SAFETENSORS_HEADER_LIMIT = 100 << 20


def safetensors_values(folder: Path) -> int | None:
    """The number of values the safetensors files in `folder` hold, from their headers
    (never their data), or None when the weights are not safetensors."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))
            if length > SAFETENSORS_HEADER_LIMIT:
                raise ModelLoadError(
                    f"{file} is not a safetensors file (header of {length:,} bytes)"
                )
            try:
                header = json.loads(fh.read(length))
            except ValueError:
                raise ModelLoadError(f"{file} is not a safetensors file") from None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                count = 1
                for n in entry.get("shape", []):
                    count *= int(n)
                total += count
    return total
