"""The Store: image metadata, durable vectors and the manifest in SQLite (SQLAlchemy 2.0).

SQLite is the source of truth for an index. Every change is one transaction that also bumps
a generation number, so the FAISS file (a derived cache) can tell whether it is current.

This module opens the database and keeps the meta table (manifest, generations); the rest
of the Store's methods live with the table or concern they work on, one part each:
images.py (reading image rows), writes.py (the index run's writes), vectors.py, labels.py,
clusters.py, and integrity.py (what `verify` checks and `repair` fixes). `Store` is all of
them in one class.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, event, or_, select
from sqlalchemy import exc as sql_exc
from sqlalchemy.engine import ExceptionContext

from simsearch.errors import DatabaseError, DatabaseOperationalError, IndexFormatError
from simsearch.storage import schema
from simsearch.storage.base import (
    FETCH_ROWS,
    IDS_PER_STATEMENT,
    META,
    ROWS_PER_STATEMENT,
    put_meta,
)
from simsearch.storage.clusters import ClustersPart
from simsearch.storage.images import (
    STATUS_ERROR,
    STATUS_OK,
    BadImage,
    GoodImage,
    ImagesPart,
    Known,
    Moved,
)
from simsearch.storage.integrity import IntegrityPart, StoreReport
from simsearch.storage.labels import LabelsPart
from simsearch.storage.manifest import Manifest
from simsearch.storage.vectors import VectorsPart
from simsearch.storage.writes import WritesPart

# The records the Store takes and returns, importable from here as before the split.
__all__ = [
    "FETCH_ROWS",
    "IDS_PER_STATEMENT",
    "ROWS_PER_STATEMENT",
    "STATUS_ERROR",
    "STATUS_OK",
    "BadImage",
    "GoodImage",
    "Known",
    "Moved",
    "Store",
    "StoreReport",
]

# What SQLite says when the storage, not the database, is at fault.
STORAGE_ERRORS = (
    "unable to open",
    "readonly",
    "read-only",
    "disk i/o error",
    "database or disk is full",
    "file is too large",
    "permission",
)

# Both generation numbers, read together (Store.generations). OR, not IN: an IN list is
# rendered anew on each execution, and this runs on every search.
_GENERATIONS = select(META.c.key, META.c.value).where(
    or_(META.c.key == "generation", META.c.key == "faiss_generation")
)


class Store(ImagesPart, WritesPart, VectorsPart, LabelsPart, ClustersPart, IntegrityPart):
    """SQLite database of one index. Open with `Store(path)`; `create=True` makes a new one.

    One class made of its parts (base.StoreBase subclasses, one per table or concern), so
    callers keep one object with every method, and each method is written once, beside
    the others on its table; the parts share only the engine, the path and the meta reads.
    """

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(self.path)
        # An index on read-only storage (a mounted backup, a shared disk) is searched as it
        # is: SQLite then takes it as immutable, as it cannot make the WAL's shared-memory
        # file beside it; simsearch's writers refuse it with one line (lock.py).
        self.read_only = not create and not os.access(self.path.parent, os.W_OK)
        if self.read_only:
            uri = f"file:{quote(str(self.path))}?mode=ro&immutable=1"
            self.engine = create_engine(
                "sqlite://",
                creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
            )
        else:
            self.engine = create_engine(f"sqlite:///{self.path}")
        self._facts_columns: bool | None = None
        # The manifest's dimension, once read: stored vectors are checked against it.
        self.dim: int | None = None
        event.listen(
            self.engine, "connect", _on_connect_read_only if self.read_only else _on_connect
        )
        # Every database error of this engine (a statement, a fetch, a commit, a connect)
        # reaches the caller as a simsearch error, never as SQLAlchemy's.
        event.listen(self.engine, "handle_error", _simsearch_error, retval=True)
        self._version: int | None = None
        if create:
            schema.create(self.engine)

    def migrate(self) -> list[int]:
        """Bring an index made by an earlier version to the current schema (the first open
        that may write does it, once: seconds on a million images); return the versions it
        stepped through."""
        try:  # on SQLite's own connection: its errors are sqlite3's, made simsearch's here
            done = schema.migrate(self.engine, str(self.path))
        except sqlite3.Error as exc:
            raise database_error(exc, isinstance(exc, sqlite3.OperationalError)) from None
        self._version = schema.SCHEMA_VERSION
        return done

    def check_schema(self) -> None:
        """Raise IndexFormatError for a database made by a newer simsearch."""
        schema.check_version(self.schema_version, str(self.path))

    def close(self) -> None:
        self.engine.dispose()

    # -- manifest and generations --------------------------------------------------------

    def manifest(self) -> Manifest | None:
        text = self._get_meta("manifest")
        if text is None:
            return None
        manifest = Manifest.from_json(text, f"the manifest in {self.path.name}")
        self.dim = manifest.dim
        return manifest

    def set_manifest(self, manifest: Manifest) -> None:
        with self.engine.begin() as conn:
            put_meta(conn, "manifest", manifest.to_json())

    def roots(self) -> list[str]:
        """The folders and files `add` was given (absolute), in the order first given: what
        a later run over "the index's folders" goes over. [] for indexes made before."""
        try:
            value = json.loads(self._get_meta("roots") or "[]")
        except ValueError:
            return []
        return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []

    def add_roots(self, paths: list[str]) -> None:
        known = self.roots()
        new = [p for p in dict.fromkeys(paths) if p not in known]
        if new:
            with self.engine.begin() as conn:
                # json.dumps escapes a non-UTF-8 name's surrogates; loads gives them back.
                put_meta(conn, "roots", json.dumps(known + new))

    def repair_meta(self, manifest: Manifest | None = None) -> bool:
        """Write `manifest` (when given) as the database's, and renew the generation numbers
        if they are not numbers (the FAISS file is then stale and rebuilt); return whether
        they were renewed."""
        with self.engine.begin() as conn:
            if manifest is not None:
                put_meta(conn, "manifest", manifest.to_json())
            current = conn.scalar(select(META.c.value).where(META.c.key == "generation"))
            try:
                int(current or 0)
            except ValueError:
                # Above any count a reader may hold, so no cache in memory passes for current.
                put_meta(conn, "generation", str(time.time_ns() // 1000))
                put_meta(conn, "faiss_generation", "-1")
                return True
        return False

    def generation(self) -> int:
        """Return the number of committed changes to images and vectors."""
        return _generation(self._get_meta("generation"), "generation", self.path.name)

    def set_faiss_generation(self, generation: int, info: str | None = None) -> None:
        """Record that the FAISS file holds `generation`; `info` (JSON) says what it is."""
        with self.engine.begin() as conn:
            put_meta(conn, "faiss_generation", str(generation))
            if info is not None:
                put_meta(conn, "faiss_info", info)

    def faiss_info(self) -> dict:
        """What the saved FAISS file is (kind, factory, ...); {} for files saved before
        simsearch recorded it, which are all exact (Flat)."""
        text = self._get_meta("faiss_info")
        try:
            info = {} if text is None else json.loads(text)
        except ValueError:
            return {"damaged": True}  # the file is then rebuilt: it is only a cache
        return info if isinstance(info, dict) else {"damaged": True}

    def generations(self) -> tuple[int, int]:
        """Return (generation, faiss_generation), read together in one consistent snapshot."""
        # Readers call this on every search: one prebuilt statement, compiled once (cached).
        with self.engine.connect() as conn:
            values: dict[str, str] = dict(conn.execute(_GENERATIONS).all())
        generation = _generation(values.get("generation"), "generation", self.path.name)
        try:  # which generation the FAISS file (a cache) holds: if unknown, it is stale
            saved = int(values.get("faiss_generation", -1))
        except (TypeError, ValueError):
            saved = -1
        return generation, saved


def _generation(value: str | None, key: str, where: str) -> int:
    """The generation number stored under `key`, or IndexFormatError if it is not one."""
    try:
        return int(value or 0)
    except ValueError:
        assert value is not None  # int(None or 0) is 0: only a value fails
        raise IndexFormatError(
            f"{where} is damaged: its {key} is {value[:40]!r}, not a number", fix="repair"
        ) from None


def storage_at_fault(reason: object) -> bool:
    """Whether SQLite's message blames the storage (read-only, full, failing, a file size
    limit, permission) rather than the database."""
    return any(text in str(reason).lower() for text in STORAGE_ERRORS)


def _simsearch_error(context: ExceptionContext) -> BaseException | None:
    """SQLAlchemy's handle_error hook: a database error as errors.DatabaseError (or its
    DatabaseOperationalError, as SQLite classes it), with the one line a user is shown and
    SQLite's exception as `orig`; any other error is left as it is."""
    error = context.sqlalchemy_exception
    if not isinstance(error, sql_exc.DatabaseError):
        return None
    return database_error(error.orig or error, isinstance(error, sql_exc.OperationalError))


def database_message(reason: BaseException, where: object = "the index database") -> str:
    """The one line a user is shown for SQLite's error `reason` on the database `where`:
    the storage's fault (the index may be intact), or damage."""
    if storage_at_fault(reason):
        return (
            f"cannot use {where} ({reason}): the storage is read-only, full, failing, or "
            "limits file sizes, or you lack permission; the index itself may be intact "
            "(verify it once that is fixed)"
        )
    return (
        f"{where} is damaged or unreadable ({reason}); restore it from a backup, or build "
        "a new index"
    )


def database_error(reason: BaseException, operational: bool) -> DatabaseError:
    """SQLite's error `reason` as errors.DatabaseError (DatabaseOperationalError where SQLite
    calls it operational)."""
    error = DatabaseOperationalError if operational else DatabaseError
    return error(database_message(reason), reason)


def _on_connect_read_only(dbapi_conn, _record) -> None:
    dbapi_conn.execute("PRAGMA query_only=ON")


def _on_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets searches read while a writer commits; FULL makes each commit survive power loss.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
