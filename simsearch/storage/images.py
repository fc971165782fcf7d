"""The Store's images table, read: what it knows of each file (size, mtime, content hash,
the header's facts, its error), and the records it takes and returns (writes.py writes).

A path is kept losslessly (schema.FsPath): a name that is not UTF-8 round-trips as bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ColumnElement, Select, bindparam, func, null, select

from simsearch.records import FailedFile, FileFacts
from simsearch.storage.base import IMAGES, VECTORS, StoreBase, by_ids, table_columns

STATUS_OK = "ok"
STATUS_ERROR = "error"

# The reads by id that run on every search or dedup, built once (base.by_ids).
_PATHS = by_ids(select(IMAGES.c.id, IMAGES.c.path), IMAGES.c.id)
_IMAGE_FACTS = by_ids(
    select(
        IMAGES.c.id,
        IMAGES.c.path,
        IMAGES.c.width,
        IMAGES.c.height,
        IMAGES.c.size,
        IMAGES.c.mtime_ns,
    ),
    IMAGES.c.id,
)
_RECORD_KEYS = ("path", "size", "mtime_ns", "sha256", "width", "height")
_FILE_RECORDS = by_ids(select(IMAGES.c.id, *(IMAGES.c[key] for key in _RECORD_KEYS)), IMAGES.c.id)


def _keep_facts(facts: list[ColumnElement]) -> Select:
    """keep_facts' read, with `facts` standing for the format and lossless columns."""
    columns = (IMAGES.c.id, IMAGES.c.path, IMAGES.c.status, IMAGES.c.width, IMAGES.c.height)
    stmt = select(*columns, *facts, IMAGES.c.size, IMAGES.c.mtime_ns)
    return by_ids(stmt, IMAGES.c.id)


_KEEP_FACTS = _keep_facts([IMAGES.c.format, IMAGES.c.lossless])
# An index made before the format was recorded, not yet migrated: NULL in their place.
_KEEP_FACTS_BEFORE = _keep_facts([null().label("format"), null().label("lossless")])
_LOOKUP = select(IMAGES.c.id, IMAGES.c.size, IMAGES.c.mtime_ns, IMAGES.c.status).where(
    IMAGES.c.path == bindparam("path")
)


@dataclass(frozen=True)
class Known:
    """What the store remembers of a file, to decide whether it must be read again."""

    id: int
    size: int
    mtime_ns: int
    status: str
    sha256: str | None = None
    device: int | None = None
    has_facts: bool = True  # the row holds the header's facts (format, true pixel size)

    def unchanged(self, st: os.stat_result) -> bool:
        """Return True when the file was indexed and still has the size and mtime it had."""
        return self.same(st.st_size, st.st_mtime_ns)

    def same(self, size: int, mtime_ns: int) -> bool:
        """Return True when the file (or object) was indexed with this size and mtime."""
        return self.status == STATUS_OK and (self.size, self.mtime_ns) == (size, mtime_ns)


@dataclass(frozen=True)
class GoodImage:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    format: str | None = None
    lossless: bool | None = None
    device: int | None = None


@dataclass(frozen=True)
class Moved:
    """An indexed file found under a new path with the same content: its row moves along."""

    id: int
    path: str
    size: int
    mtime_ns: int
    device: int | None = None


@dataclass(frozen=True)
class BadImage:
    path: str
    size: int
    mtime_ns: int
    error: str
    sha256: str | None = None


class ImagesPart(StoreBase):
    """The images table, read (writes.py writes it)."""

    _facts_columns: bool | None  # whether the table has the header's facts (format, ...)

    def known_files(self) -> dict[str, Known]:
        """Return every stored path with its size, mtime, status and device (a writer's
        call: it reads the columns migration 1 adds)."""
        stmt = select(
            IMAGES.c.path,
            IMAGES.c.id,
            IMAGES.c.size,
            IMAGES.c.mtime_ns,
            IMAGES.c.status,
            IMAGES.c.sha256,
            IMAGES.c.device,
            IMAGES.c.format.is_not(None),
        )
        with self.engine.connect() as conn:
            return {row[0]: Known(*row[1:]) for row in conn.execute(stmt)}

    def counts(self) -> tuple[int, int]:
        """Return (images with a vector, failed images)."""
        with self.engine.connect() as conn:
            indexed = conn.scalar(select(func.count()).select_from(VECTORS))
            failed = conn.scalar(select(func.count()).where(IMAGES.c.status == STATUS_ERROR))
        assert indexed is not None and failed is not None  # a count always has its row
        return int(indexed), int(failed)

    def failed(self) -> list[FailedFile]:
        stmt = (
            select(IMAGES.c.path, IMAGES.c.error)
            .where(IMAGES.c.status == STATUS_ERROR)
            .order_by(IMAGES.c.path)
        )
        with self.engine.connect() as conn:
            return [FailedFile(p, e or "") for p, e in conn.execute(stmt)]

    def paths(self, ids: Sequence[int] | np.ndarray) -> dict[int, str]:
        """Return the stored path of each id that exists."""
        rows = self._rows_by_id(_PATHS, ids)
        return {int(i): p for i, p in rows}

    def lookup(self, path: str) -> Known | None:
        """Return what the store knows of `path`, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(_LOOKUP, {"path": path}).first()
        return None if row is None else Known(*row)

    def same_content(self) -> list[list[int]]:
        """Return the ids of each set of two or more indexed files with the same SHA-256."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(func.group_concat(IMAGES.c.id))
                .where(IMAGES.c.status == STATUS_OK, IMAGES.c.sha256.is_not(None))
                .group_by(IMAGES.c.sha256)
                .having(func.count() > 1)
            )
            return [sorted(int(i) for i in ids.split(",")) for (ids,) in rows]

    def image_facts(self, ids: Sequence[int]) -> dict[int, tuple]:
        """Return id -> (path, width, height, size, mtime_ns) for each id that exists."""
        return {int(r[0]): tuple(r[1:]) for r in self._rows_by_id(_IMAGE_FACTS, ids)}

    def keep_facts(self, ids: Sequence[int]) -> dict[int, tuple]:
        """Return id -> (path, status, FileFacts) for each id that exists: what dedup's keep
        rule compares. Indexes made before the format was recorded give format None."""
        stmt = _KEEP_FACTS if self._has_facts_columns() else _KEEP_FACTS_BEFORE
        out = {}
        for image_id, path, status, w, h, fmt, lossless, size, mtime_ns in self._rows_by_id(
            stmt, ids
        ):
            lossless = None if lossless is None else bool(lossless)
            out[int(image_id)] = (
                path,
                status,
                FileFacts(w or 0, h or 0, fmt, lossless, size, mtime_ns),
            )
        return out

    def _has_facts_columns(self) -> bool:
        """Whether the images table has the format column (a reader may open an index made
        before it, on storage it cannot migrate)."""
        if self._facts_columns is None and self.schema_version >= 1:
            self._facts_columns = True
        if self._facts_columns is None:
            with self.engine.connect() as conn:
                self._facts_columns = "format" in table_columns(conn, "images")
        return self._facts_columns

    def file_records(self, ids: Sequence[int]) -> dict[int, dict]:
        """Return id -> {path, size, mtime_ns, sha256, width, height} for each id that
        exists: what acting on a file checks it against and what undoing it restores."""
        return {
            int(r[0]): dict(zip(_RECORD_KEYS, r[1:], strict=True))
            for r in self._rows_by_id(_FILE_RECORDS, ids)
        }

    def path_bounds(self) -> list[str]:
        """Return the smallest and largest stored path of each kind (UTF-8 names as TEXT,
        other names as bytes; [] when empty): the folder that holds every stored file is
        the common folder of these."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(func.min(IMAGES.c.path), func.max(IMAGES.c.path)).group_by(
                    func.typeof(IMAGES.c.path)
                )
            ).all()
        # (min and max are of the path's type: a BLOB comes back as the os.fsdecode str)
        return [p for row in rows for p in row]
