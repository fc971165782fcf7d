"""The Store's images table: what it knows of each file (size, mtime, content hash, the
header's facts, its error), and the index run's writes (a batch, a prune).

A path is kept losslessly (schema.FsPath): a name that is not UTF-8 round-trips as bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from simsearch.fs.faults import crash_point
from simsearch.fs.names import from_column
from simsearch.records import FailedFile, FileFacts
from simsearch.storage.base import (
    ROWS_PER_STATEMENT,
    StoreBase,
    bump_generation,
    chunks,
    table_columns,
)
from simsearch.storage.checks import check_vectors
from simsearch.storage.clusters import drop_clusters
from simsearch.storage.labels import delete_labels
from simsearch.storage.schema import ImageRow, VectorRow

STATUS_OK = "ok"
STATUS_ERROR = "error"


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
        return self.status == STATUS_OK and (self.size, self.mtime_ns) == (
            st.st_size,
            st.st_mtime_ns,
        )


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
    """The images table: reading what is stored of files, and writing the index run's."""

    _facts_columns: bool | None  # whether the table has the header's facts (format, ...)

    def known_files(self) -> dict[str, Known]:
        """Return every stored path with its size, mtime, status and device (a writer's
        call: it reads the columns migration 1 adds)."""
        stmt = select(
            ImageRow.path,
            ImageRow.id,
            ImageRow.size,
            ImageRow.mtime_ns,
            ImageRow.status,
            ImageRow.sha256,
            ImageRow.device,
            ImageRow.format.is_not(None),
        )
        with Session(self.engine) as session:
            return {row[0]: Known(*row[1:]) for row in session.execute(stmt)}

    def counts(self) -> tuple[int, int]:
        """Return (images with a vector, failed images)."""
        with Session(self.engine) as session:
            indexed = session.scalar(select(func.count()).select_from(VectorRow))
            failed = session.scalar(select(func.count()).where(ImageRow.status == STATUS_ERROR))
        assert indexed is not None and failed is not None  # a count always has its row
        return int(indexed), int(failed)

    def failed(self) -> list[FailedFile]:
        stmt = (
            select(ImageRow.path, ImageRow.error)
            .where(ImageRow.status == STATUS_ERROR)
            .order_by(ImageRow.path)
        )
        with Session(self.engine) as session:
            return [FailedFile(p, e or "") for p, e in session.execute(stmt)]

    def paths(self, ids: Sequence[int] | np.ndarray) -> dict[int, str]:
        """Return the stored path of each id that exists."""
        rows = self._rows_by_id("SELECT id, path FROM images", "id", ids)
        return {int(i): from_column(p) for i, p in rows}

    def lookup(self, path: str) -> Known | None:
        """Return what the store knows of `path`, or None."""
        stmt = select(ImageRow.id, ImageRow.size, ImageRow.mtime_ns, ImageRow.status).where(
            ImageRow.path == path
        )
        with Session(self.engine) as session:
            row = session.execute(stmt).first()
        return None if row is None else Known(*row)

    def same_content(self) -> list[list[int]]:
        """Return the ids of each set of two or more indexed files with the same SHA-256."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT group_concat(id) FROM images WHERE status = 'ok' AND sha256 IS NOT "
                "NULL GROUP BY sha256 HAVING count(*) > 1"
            )
            return [sorted(int(i) for i in ids.split(",")) for (ids,) in rows]

    def image_facts(self, ids: Sequence[int]) -> dict[int, tuple]:
        """Return id -> (path, width, height, size, mtime_ns) for each id that exists."""
        select = "SELECT id, path, width, height, size, mtime_ns FROM images"
        return {int(r[0]): (from_column(r[1]), *r[2:]) for r in self._rows_by_id(select, "id", ids)}

    def keep_facts(self, ids: Sequence[int]) -> dict[int, tuple]:
        """Return id -> (path, status, FileFacts) for each id that exists: what dedup's keep
        rule compares. Indexes made before the format was recorded give format None."""
        columns = "format, lossless" if self._has_facts_columns() else "NULL, NULL"
        select = f"SELECT id, path, status, width, height, {columns}, size, mtime_ns FROM images"
        out = {}
        for image_id, path, status, w, h, fmt, lossless, size, mtime_ns in self._rows_by_id(
            select, "id", ids
        ):
            lossless = None if lossless is None else bool(lossless)
            out[int(image_id)] = (
                from_column(path),
                status,
                FileFacts(w or 0, h or 0, fmt, lossless, size, mtime_ns),
            )
        return out

    def set_header_facts(self, rows: Sequence[tuple[int, int, int, str | None, bool]]) -> None:
        """Record (id, width, height, format, lossless) read from files' headers. No vector
        changes, so the generation stays (the FAISS file stays current)."""
        if not rows:
            return
        with Session(self.engine) as session, session.begin():
            for chunk in chunks(list(rows), ROWS_PER_STATEMENT):
                session.execute(
                    update(ImageRow),
                    [
                        dict(id=i, width=w, height=h, format=f, lossless=int(bool(lossless)))
                        for i, w, h, f, lossless in chunk
                    ],
                )

    def set_devices(self, rows: Sequence[tuple[int, int]]) -> None:
        """Record (id, st_dev) for files whose file system has another number now."""
        if not rows:
            return
        with Session(self.engine) as session, session.begin():
            for chunk in chunks(list(rows), ROWS_PER_STATEMENT):
                session.execute(update(ImageRow), [dict(id=i, device=d) for i, d in chunk])

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
        select = "SELECT id, path, size, mtime_ns, sha256, width, height FROM images"
        keys = ("path", "size", "mtime_ns", "sha256", "width", "height")
        return {
            int(r[0]): dict(zip(keys, (from_column(r[1]), *r[2:]), strict=True))
            for r in self._rows_by_id(select, "id", ids)
        }

    def path_bounds(self) -> list[str]:
        """Return the smallest and largest stored path of each kind (UTF-8 names as TEXT,
        other names as bytes; [] when empty): the folder that holds every stored file is
        the common folder of these."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT min(path), max(path) FROM images GROUP BY typeof(path)"
            ).all()
        return [from_column(p) for row in rows for p in row]

    def write_batch(
        self,
        good: Sequence[GoodImage],
        vectors: np.ndarray,
        bad: Sequence[BadImage] = (),
        moves: Sequence[Moved] = (),
    ) -> tuple[list[int], list[int]]:
        """Store a batch of embedded, failed and moved files in one transaction.

        Returns (ids of `good`, in order; ids of `bad` rows that lost a vector). A path seen
        before keeps its id; its row and vector are replaced. A move gives an existing row
        (and so its vector) a new path.
        """
        if len(good) != len(vectors):
            raise ValueError("one vector per good image is required")
        now = time.time()
        if len(vectors):
            # The last guard: whatever produced them, no vector that search cannot use.
            vectors = check_vectors(vectors, vectors.shape[1], "this batch")
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with Session(self.engine) as session, session.begin():
            ok_rows = [
                _image_row(
                    img,
                    now,
                    width=img.width,
                    height=img.height,
                    format=img.format,
                    lossless=None if img.lossless is None else int(img.lossless),
                    device=img.device,
                    status=STATUS_OK,
                )
                for img in good
            ]
            # Labels and clusters describe content and vectors: a path whose content
            # changed loses them (the next labelling pass labels it again; the next
            # `cluster` run assigns it); a touched file with the same bytes keeps them.
            stale = _changed_content(session, good)
            id_of = _upsert_images(session, ok_rows)
            ids = [id_of[img.path] for img in good]
            _upsert_vectors(session, ids, vectors)
            bad_rows = [_image_row(img, now, status=STATUS_ERROR, error=img.error) for img in bad]
            bad_ids = list(_upsert_images(session, bad_rows).values())
            dropped = list(
                session.scalars(select(VectorRow.image_id).where(VectorRow.image_id.in_(bad_ids)))
            )
            if dropped:
                session.execute(delete(VectorRow).where(VectorRow.image_id.in_(dropped)))
            delete_labels(session, [*stale, *bad_ids])
            # A new vector (or none) was not part of the last clustering: its image waits,
            # unassigned, for the next `cluster` run rather than keep a stale cluster.
            drop_clusters(session, [*stale, *bad_ids])
            for move in moves:
                session.execute(
                    update(ImageRow)
                    .where(ImageRow.id == move.id)
                    .values(
                        path=move.path,
                        size=move.size,
                        mtime_ns=move.mtime_ns,
                        device=move.device,
                        indexed_at=now,
                    )
                )
            bump_generation(session)
            crash_point("commit")
        return ids, dropped

    def remove_images(self, ids: Sequence[int]) -> int:
        """Delete images (and their vectors and labels) in one transaction; returns how many
        there were."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with Session(self.engine) as session, session.begin():
            removed = 0
            for chunk in chunks(ids):
                removed += session.execute(delete(ImageRow).where(ImageRow.id.in_(chunk))).rowcount  # type: ignore[attr-defined]
            bump_generation(session)
            crash_point("prune")
        return removed


def _image_row(img: GoodImage | BadImage, now: float, **columns) -> dict:
    """Return the images-table row for a file: its identity plus the given status columns."""
    row = dict(
        path=img.path,
        size=img.size,
        mtime_ns=img.mtime_ns,
        indexed_at=now,
        sha256=img.sha256,
        width=None,
        height=None,
        format=None,
        lossless=None,
        device=None,
        error=None,
    )
    row.update(columns)
    return row


def _upsert_images(session: Session, rows: list[dict]) -> dict[str, int]:
    """Insert image rows, or update those whose path exists; return path -> id."""
    ids: dict[str, int] = {}
    for chunk in chunks(rows, ROWS_PER_STATEMENT):
        stmt = insert(ImageRow).values(chunk)
        upsert = stmt.on_conflict_do_update(
            index_elements=["path"],
            set_={c: stmt.excluded[c] for c in rows[0] if c != "path"},
        ).returning(ImageRow.id, ImageRow.path)
        ids.update({path: int(i) for i, path in session.execute(upsert)})
    return ids


def _upsert_vectors(session: Session, ids: list[int], vectors: np.ndarray) -> None:
    rows = [dict(image_id=i, vector=v.tobytes()) for i, v in zip(ids, vectors, strict=True)]
    for chunk in chunks(rows, ROWS_PER_STATEMENT):
        stmt = insert(VectorRow).values(chunk)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["image_id"], set_={"vector": stmt.excluded.vector}
            )
        )


def _changed_content(session: Session, good: Sequence[GoodImage]) -> list[int]:
    """Return the ids of stored paths among `good` whose content (SHA-256) is new."""
    new_sha = {img.path: img.sha256 for img in good}
    stale = []
    for chunk in chunks(list(new_sha)):
        rows = session.execute(
            select(ImageRow.id, ImageRow.path, ImageRow.sha256).where(ImageRow.path.in_(chunk))
        )
        stale += [i for i, path, sha in rows if sha is None or sha != new_sha[path]]
    return stale
