"""The manifest of moved duplicates (JSON lines in the folder they were moved to): writing it
durably, and reading it back as data to check, never as orders.

A manifest is read line by line (memory stays bounded whatever its size) and every field of
every line is checked before `undo` moves anything: types, absolute normalised paths, every
source of a move under the root the moves were made from and its destination exactly where
`move` put it in the folder that holds the manifest, vectors finite, of the index's
dimension and of unit length. An unterminated last line is what a crash or a full disk
leaves while a move is being logged, before that move is made: it is ignored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeGuard

import numpy as np

from simsearch.errors import QueryError

MANIFEST_KIND = "simsearch-dedup-moves"
MANIFEST_VERSION = 1

# The longest line read: a move's line holds one vector (a 4096-dim one is 22 KB of base64)
# and the labels of one image; anything longer is not ours, and is refused unread.
MAX_LINE_BYTES = 1 << 20
# How far a stored vector's length may be from 1 (as `verify` allows).
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: its header, the root the moves were made from, the folder the
    files were moved to, and how many bytes of it hold whole lines."""

    path: Path
    header: dict
    root: Path
    target: Path  # as the entries name it
    folder: Path  # the folder that holds the manifest: where the moved files are
    length: int
    entries: int
    span: Path | None  # the common folder of every entry's source and kept image


class ManifestWriter:
    """Append records to a new manifest, each durable before what it describes happens."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "xb", buffering=0)  # noqa: SIM115 (closed by close())
        self.length = 0

    def append(self, record: dict) -> None:
        """Write one line and fsync it; on an error (a full disk), cut back any part of it
        written, so the manifest stays whole, and raise."""
        data = (json.dumps(record) + "\n").encode()
        try:
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError:
            # Shortening a file needs no space; if even that fails, the reader ignores a
            # torn last line anyway.
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), self.length)
            raise
        self.length += len(data)

    def close(self) -> None:
        self.file.close()


def append_undone(manifest: Manifest, when: str) -> None:
    """Note in the manifest that it was undone (after cutting off a torn last line, which
    logged a move never made, so that the note does not hide it mid-file)."""
    with open(manifest.path, "r+b", buffering=0) as f:
        f.truncate(manifest.length)
        f.seek(manifest.length)
        f.write((json.dumps({"undone": when}) + "\n").encode())
        os.fsync(f.fileno())


def read_header(path: Path) -> dict:
    """Return the checked header (first line) of a manifest, reading nothing more."""
    for number, line, _ in _lines(Path(path)):
        return _header(path, number, line)
    raise QueryError(f"{path} is not a manifest of moved duplicates: it is empty")


def check(path: Path, dim: int) -> Manifest:
    """Read and check a whole manifest; return what `entries` needs. QueryError, one line
    naming the first bad line, for anything `move` would not have written."""
    path = Path(os.path.abspath(path))
    header, root, target, folder, length, count, span = None, None, None, path.parent, 0, 0, None
    for number, line, end in _lines(path):
        if header is None:
            header = _header(path, number, line)
            root = Path(header["root"])
            target = Path(header.get("target", folder))
            if os.path.realpath(target) != os.path.realpath(folder):
                _bad(path, number, f"it names the folder {target}, but it is in {folder}")
        else:
            record = _json(path, number, line)
            if record is not None:
                assert root is not None and target is not None  # set from the header
                entry = _entry(path, number, record, root, target, dim)
                if entry is not None:
                    count += 1
                    here = [os.path.dirname(entry["from"]), os.path.dirname(entry["keep"])]
                    span = Path(os.path.commonpath([*([str(span)] if span else []), *here]))
        length = end
    if header is None:
        raise QueryError(f"{path} is not a manifest of moved duplicates: it is empty")
    assert root is not None and target is not None  # set from the header
    return Manifest(path, header, root, target, folder, length, count, span)


def entries(manifest: Manifest, dim: int) -> Iterator[dict]:
    """Yield the move entries of a checked manifest (checked again as they are read: a
    manifest changed since `check` stops the run with QueryError)."""
    for number, line, end in _lines(manifest.path):
        if number == 1 or end > manifest.length:
            continue
        record = _json(manifest.path, number, line)
        if record is not None:
            entry = _entry(manifest.path, number, record, manifest.root, manifest.target, dim)
            if entry is not None:
                yield entry


def _lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """Yield (number, line, offset after it) for each whole line; stop silently at an
    unterminated last one (torn: its move never happened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise QueryError(f"{path} is not a manifest of moved duplicates: not a file")
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise QueryError(f"no such manifest: {path}") from None
    except OSError as exc:
        raise QueryError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        number, offset = 0, 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_BYTES:
                _bad(path, number, f"longer than {MAX_LINE_BYTES} bytes")
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield number, line, offset


def _bad(path: Path, number: int, what: str) -> NoReturn:
    raise QueryError(
        f"{path} is not a manifest of moved duplicates as simsearch writes them (line "
        f"{number}: {what}); nothing was moved"
    )


def _json(path: Path, number: int, line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        _bad(path, number, f"not JSON: {exc}")
    if not isinstance(record, dict):
        _bad(path, number, "not a JSON object")
    return record


def _header(path: Path, number: int, line: bytes) -> dict:
    header = _json(path, number, line)
    if header is None or header.get("kind") != MANIFEST_KIND:
        raise QueryError(f"{path} is not a manifest of moved duplicates")
    version = header.get("version")
    if not _is_int(version):
        _bad(path, number, "no version")
    if version > MANIFEST_VERSION:
        raise QueryError(f"{path} was written by a newer simsearch; upgrade to undo it")
    for key in ("index", "root"):
        _path(path, number, header, key)
    if "target" in header:
        _path(path, number, header, "target")
    return header


def _path(path: Path, number: int, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        _bad(path, number, f"no {key!r} path")
    if "\0" in value or not os.path.isabs(value) or os.path.normpath(value) != value:
        _bad(path, number, f"{key!r} is not an absolute path without '..': {value!r}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _entry(path: Path, n: int, record: dict, root: Path, target: Path, dim: int) -> dict | None:
    """Check one record; return it if it is a move, None for an `undone` note."""
    if set(record) == {"undone"} and isinstance(record["undone"], str):
        return None
    source = Path(_path(path, n, record, "from"))
    if root not in source.parents:
        _bad(path, n, f"{source} is not under the folder the moves were made from, {root}")
    keep = Path(_path(path, n, record, "keep"))
    if root not in keep.parents:
        _bad(path, n, f"the kept image {keep} is not under {root}")
    dest = _path(path, n, record, "to")
    if dest != str(target / source.relative_to(root)):
        _bad(path, n, f"{dest} is not where {source} was moved to, under {target}")
    for key in ("size", "mtime_ns", "width", "height"):
        if not _is_int(record.get(key)):
            _bad(path, n, f"{key!r} is not a whole number >= 0")
    sha = record.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        _bad(path, n, "'sha256' is not a SHA-256 in hex")
    if not _is_number(record.get("score")):
        _bad(path, n, "'score' is not a number")
    if "link" in record and not (isinstance(record["link"], str) and record["link"]):
        _bad(path, n, "'link' is not a link's target")
    if "vector" in record:
        record["vector"] = _vector(path, n, record["vector"], dim)
    if "labels" in record:
        labels = record["labels"]
        if not (
            isinstance(labels, dict)
            and set(labels) == {"source", "labels"}
            and isinstance(labels["labels"], list)
            and all(
                isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and _is_number(x[1])
                for x in labels["labels"]
            )
        ):
            _bad(path, n, "'labels' is not a list of [label, score]")
    if "cluster" in record:
        cluster = record["cluster"]
        if not (
            isinstance(cluster, dict)
            and set(cluster) == {"run", "cluster", "score"}
            and (
                cluster["run"] is None
                or isinstance(cluster["run"], str)
                or _is_number(cluster["run"])
            )
            and isinstance(cluster["cluster"], int)
            and not isinstance(cluster["cluster"], bool)
            and _is_number(cluster["score"])
        ):
            _bad(path, n, "'cluster' is not {run, cluster, score}")
    return record


def _vector(path: Path, n: int, value, dim: int) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) != 4 * dim:
        _bad(path, n, f"'vector' is not {dim} float32 values in base64 (another index's?)")
    vector = np.frombuffer(raw, dtype="<f4")
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(vector).all() or abs(norm - 1) > NORM_TOLERANCE:
        _bad(path, n, "'vector' is not finite values of unit length")
    return vector
