"""The exceptions simsearch raises. The CLI turns any SimsearchError into a one-line message.

A message is plain language that reads the same from Python and from the terminal: it names
no command-line flag or command. What a program (or the CLI) needs beyond it is in fields:
`param` names the setting at fault as the Python API spells it ("output", "threshold"),
`path` the file or folder concerned, and `fix` what resolves it, one of FIXES. The CLI
turns `param` into its flag and `fix` into a command line (simsearch.cli.hints).
"""

from __future__ import annotations

import os

# What resolves an error, where the message alone cannot say it in a neutral way:
FIXES = {
    "create-index": "the index does not exist yet: create it by adding images to it",
    "new-index": "use a new index folder (for another model, or in place of a damaged one)",
    "calibrate": "calibrate the dedup threshold again",
    "threshold": "give a dedup threshold instead of calibrating one",
    "resume": "resume the interrupted fine-tune",
    "export-onnx": "export the model to ONNX first, or use the torch backend",
    "add-labels": "label the index's images with an image classification model",
    "undo": "undo the moves logged in the manifest at `path`",
    "add-images": "add images to the index (again, where they moved or changed)",
    "cluster": "cluster the index's images",
    "repair": "repair the index, which restores its database manifest from manifest.json",
    "start-ray": "start a Ray cluster, or give the address of a running one",
}


class SimsearchError(Exception):
    """Base class: an error a user can act on, with a message that says how.

    `param`: the setting the error is about, by its Python API name, or None.
    `path`: the file or folder it is about (a str), or None.
    `fix`: a key of FIXES, or None."""

    def __init__(
        self,
        message: str = "",
        *,
        param: str | None = None,
        path: str | os.PathLike[str] | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        if fix is not None and fix not in FIXES:
            raise ValueError(f"unknown fix {fix!r}")
        self.param = param
        self.path = None if path is None else os.fspath(path)
        self.fix = fix


class ModelLoadError(SimsearchError):
    """The model could not be found, downloaded or loaded."""


class ModelOutputError(SimsearchError):
    """The model produced vectors that cannot be stored: not finite, of another dimension,
    or not of unit length. Nothing from that batch is committed."""


class LayerError(SimsearchError):
    """A layer or pooling (`param` "layer" or "pool") that the model cannot provide."""


class IndexNotFoundError(SimsearchError):
    """No index exists at the given path."""


class IndexExistsError(SimsearchError):
    """An index already exists where a new one was to be created."""


class IndexFormatError(SimsearchError):
    """The index folder is not one this version can read."""


class ManifestMismatchError(SimsearchError):
    """The index was built with another model, layer or pooling."""


class ImageError(SimsearchError):
    """An image file could not be read or decoded; the message is the reason."""


class QueryError(SimsearchError):
    """A search query that names no usable image or id."""


class InputPathError(SimsearchError):
    """A path given to index does not exist."""


class IndexLockedError(SimsearchError):
    """Another process is writing to the index."""


class StorageError(SimsearchError):
    """Writing to the index failed (disk full, read-only, I/O error); committed work is kept."""


class DatabaseError(SimsearchError):
    """SQLite could not use the index database: its storage failed (read-only, full, an I/O
    error, a file size limit, no permission) or the file is damaged; the message says which.
    `orig` is SQLite's own exception (sqlite3.Error)."""

    def __init__(
        self,
        message: str,
        orig: BaseException | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message, path=path, fix=fix)
        self.orig = orig


class DatabaseOperationalError(DatabaseError):
    """A DatabaseError that SQLite calls operational (sqlite3.OperationalError): mostly the
    storage or a lock held past the busy timeout, rather than a malformed file."""


class IndexTypeError(SimsearchError, ValueError):
    """An index type (`param` "index_type") that is neither a known type nor a FAISS factory
    string FAISS builds."""


class ShardError(SimsearchError):
    """Parquet shards that an on-disk index cannot be built from (not parquet, no vector
    column, dimensions that differ, vectors that are not finite, ids that repeat), or an
    on-disk index folder that cannot be opened. Nothing is written."""


class ReportError(SimsearchError):
    """An HTML report could not be written (missing folder, no permission, disk full)."""


class ClusterError(SimsearchError):
    """A clustering the index cannot make (bad K, too few images)."""


class ModelExportError(SimsearchError):
    """A model could not be exported to ONNX, or its export failed validation."""


class FinetuneError(SimsearchError):
    """A fine-tuning run that cannot start or go on (bad data folder, settings, output)."""


class DistillError(FinetuneError):
    """A distillation run that cannot start or go on (the index, the teacher, the settings,
    the output folder)."""


class TrainingInterrupted(SimsearchError):
    """Fine-tuning stopped on request (Ctrl-C); its progress is saved and can be resumed."""


class RayError(SimsearchError):
    """A Ray run that cannot start: Ray is not installed, the cluster cannot be reached, or
    it cannot run the settings given (`param` names which)."""


class RemoteError(SimsearchError):
    """An error a simsearch server answered (simsearch.Client): `status` is the HTTP
    status, `kind` the server's error type; `param` and `fix` as the server gave them."""

    def __init__(self, message: str, *, status: int, kind: str = "", param=None, fix=None) -> None:
        super().__init__(message, param=param, fix=fix if fix in FIXES else None)
        self.status = status
        self.kind = kind


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's own, often multi-line, message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
