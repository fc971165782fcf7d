"""The exceptions simsearch raises. The CLI turns any SimsearchError into a one-line message."""


class SimsearchError(Exception):
    """Base class: an error a user can act on, with a message that says how."""


class ModelLoadError(SimsearchError):
    """The model could not be found, downloaded or loaded."""


class ModelOutputError(SimsearchError):
    """The model produced vectors that cannot be stored: not finite, of another dimension,
    or not of unit length. Nothing from that batch is committed."""


class LayerError(SimsearchError):
    """A --layer or --pool that the model cannot provide."""


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

    def __init__(self, message: str, orig: BaseException | None = None) -> None:
        super().__init__(message)
        self.orig = orig


class DatabaseOperationalError(DatabaseError):
    """A DatabaseError that SQLite calls operational (sqlite3.OperationalError): mostly the
    storage or a lock held past the busy timeout, rather than a malformed file."""


class IndexTypeError(SimsearchError, ValueError):
    """An --index-type that is neither a known type nor a FAISS factory string FAISS builds."""


class ReportError(SimsearchError):
    """An HTML report could not be written (missing folder, no permission, disk full)."""


class ClusterError(SimsearchError):
    """A clustering the index cannot make (bad K, too few images)."""


class ModelExportError(SimsearchError):
    """A model could not be exported to ONNX, or its export failed validation."""


class FinetuneError(SimsearchError):
    """A fine-tuning run that cannot start or go on (bad data folder, settings, output)."""


class TrainingInterrupted(SimsearchError):
    """Fine-tuning stopped on request (Ctrl-C); its progress is saved and can be resumed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's own, often multi-line, message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
