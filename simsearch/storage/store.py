"""The Store: image metadata, durable vectors and the manifest in SQLite (SQLAlchemy 2.0).

SQLite is the source of truth for an index. Every change is one transaction that also bumps
a generation number, so the FAISS file (a derived cache) can tell whether it is current.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import cast
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    Connection,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from simsearch.errors import IndexFormatError
from simsearch.fs.faults import crash_point
from simsearch.fs.names import from_column
from simsearch.records import FailedFile, FileFacts, Label
from simsearch.storage import schema
from simsearch.storage.checks import check_vectors
from simsearch.storage.manifest import Manifest
from simsearch.storage.schema import ClusterRow, ImageRow, LabelRow, MetaRow, VectorRow

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Rows fetched per round trip when streaming vectors out, to keep memory flat on big indexes.
FETCH_ROWS = 10_000


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


class Store:
    """SQLite database of one index. Open with `Store(path)`; `create=True` makes a new one."""

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
        self._version: int | None = None
        if create:
            schema.create(self.engine)

    def migrate(self) -> list[int]:
        """Bring an index made by an earlier version to the current schema (the first open
        that may write does it, once: seconds on a million images); return the versions it
        stepped through."""
        done = schema.migrate(self.engine, str(self.path))
        self._version = schema.SCHEMA_VERSION
        return done

    @property
    def schema_version(self) -> int:
        """The schema version of the database (0: made before versions)."""
        if self._version is None:
            self._version = schema.version(self.engine)
        return self._version

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
        with Session(self.engine) as session, session.begin():
            _put_meta(session, "manifest", manifest.to_json())

    def repair_meta(self, manifest: Manifest | None = None) -> bool:
        """Write `manifest` (when given) as the database's, and renew the generation numbers
        if they are not numbers (the FAISS file is then stale and rebuilt); return whether
        they were renewed."""
        with Session(self.engine) as session, session.begin():
            if manifest is not None:
                _put_meta(session, "manifest", manifest.to_json())
            current = session.scalar(select(MetaRow.value).where(MetaRow.key == "generation"))
            try:
                int(current or 0)
            except ValueError:
                # Above any count a reader may hold, so no cache in memory passes for current.
                _put_meta(session, "generation", str(time.time_ns() // 1000))
                _put_meta(session, "faiss_generation", "-1")
                return True
        return False

    def generation(self) -> int:
        """Return the number of committed changes to images and vectors."""
        return _generation(self._get_meta("generation"), "generation", self.path.name)

    def set_faiss_generation(self, generation: int, info: str | None = None) -> None:
        """Record that the FAISS file holds `generation`; `info` (JSON) says what it is."""
        with Session(self.engine) as session, session.begin():
            _put_meta(session, "faiss_generation", str(generation))
            if info is not None:
                _put_meta(session, "faiss_info", info)

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
        # Plain SQL: readers call this on every search, and the ORM would cost ~0.8 ms.
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT key, value FROM meta WHERE key IN ('generation', 'faiss_generation')"
            )
            values: dict[str, str] = dict(rows.all())
        generation = _generation(values.get("generation"), "generation", self.path.name)
        try:  # which generation the FAISS file (a cache) holds: if unknown, it is stale
            saved = int(values.get("faiss_generation", -1))
        except (TypeError, ValueError):
            saved = -1
        return generation, saved

    def _get_meta(self, key: str) -> str | None:
        with Session(self.engine) as session:
            return session.scalar(select(MetaRow.value).where(MetaRow.key == key))

    # -- reading -------------------------------------------------------------------------

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

    def vector_hashes(self) -> dict[str, int]:
        """Return content hash -> id of an image with that content and a vector."""
        stmt = (
            select(ImageRow.sha256, ImageRow.id)
            .join(VectorRow, VectorRow.image_id == ImageRow.id)
            .where(ImageRow.sha256.is_not(None))
        )
        with Session(self.engine) as session:  # (sha256 IS NOT NULL: a str)
            return {cast(str, sha): i for sha, i in session.execute(stmt)}

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

    def copy_sources(
        self, ids: Iterable[int]
    ) -> dict[int, tuple[np.ndarray, int, int, str | None]]:
        """Return id -> (vector, width, height, sha256) for images whose vector is reused."""
        stmt = (
            select(ImageRow.id, VectorRow.vector, ImageRow.width, ImageRow.height, ImageRow.sha256)
            .join(VectorRow, VectorRow.image_id == ImageRow.id)
            .where(ImageRow.id.in_([int(i) for i in ids]))
        )
        with Session(self.engine) as session:
            return {
                i: (self._vector(i, blob).copy(), w or 0, h or 0, sha)
                for i, blob, w, h, sha in session.execute(stmt)
            }

    def _vector(self, image_id, blob: bytes) -> np.ndarray:
        """A stored vector blob as float32, or IndexFormatError when it is damaged."""
        return _vector_of(image_id, blob, self.dim, self.path.name)

    def vectors_by_id(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """Return id -> stored vector for each of `ids` that has one."""
        rows = self._rows_by_id("SELECT image_id, vector FROM vectors", "image_id", ids)
        return {int(i): self._vector(i, blob) for i, blob in rows}

    def vector(self, image_id: int) -> np.ndarray | None:
        """Return the stored vector of an image, or None when it has none."""
        with Session(self.engine) as session:
            blob = session.scalar(select(VectorRow.vector).where(VectorRow.image_id == image_id))
        return None if blob is None else self._vector(image_id, blob).copy()

    def iter_vectors(
        self, dim: int, rows: int = FETCH_ROWS, skip: set[int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64, vectors float32) chunks of every stored vector, in id order.

        `skip`: ids to leave out (vectors known to be damaged).
        """
        last = -1
        with Session(self.engine) as session:
            while True:
                stmt = (
                    select(VectorRow.image_id, VectorRow.vector)
                    .where(VectorRow.image_id > last)
                    .order_by(VectorRow.image_id)
                    .limit(rows)
                )
                chunk = session.execute(stmt).all()
                if not chunk:
                    return
                last = int(chunk[-1][0])
                if skip:
                    chunk = [row for row in chunk if row[0] not in skip]
                    if not chunk:
                        continue
                ids = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))
                vecs = _stacked(chunk, 1, dim, self.path.name)
                yield ids, vecs.astype(np.float32, copy=False)

    @contextlib.contextmanager
    def snapshot_items(self, dim: int, rows: int = FETCH_ROWS):
        """Yield (count, extras, chunks): the number of indexed images, the names of the
        extra columns this index has ("labels", "cluster"), and an iterator of (ids, paths,
        vectors, extras) chunks in id order, extras a dict of one list per extra column
        (None where an image has no value), all read from one snapshot of the database (a
        writer may commit meanwhile; this read does not see it)."""
        with self.engine.connect() as conn:
            # pysqlite runs SELECTs outside transactions; an explicit BEGIN pins the snapshot.
            conn.exec_driver_sql("BEGIN")
            try:
                total = conn.exec_driver_sql("SELECT count(*) FROM vectors").scalar_one()
                extras = [
                    column
                    for column, table in (("labels", "labels"), ("cluster", "clusters"))
                    if _has_rows(conn, table)
                ]
                yield int(total), extras, self._items(conn, dim, rows, extras)
            finally:
                conn.exec_driver_sql("ROLLBACK")

    @staticmethod
    def _items(conn, dim: int, rows: int, extras: list[str]) -> Iterator[tuple]:
        last = -1
        while True:
            chunk = conn.exec_driver_sql(
                "SELECT v.image_id, i.path, v.vector FROM vectors v "
                "JOIN images i ON i.id = v.image_id WHERE v.image_id > ? "
                "ORDER BY v.image_id LIMIT ?",
                (last, rows),
            ).all()
            if not chunk:
                return
            first, last = int(chunk[0][0]), int(chunk[-1][0])
            ids = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))
            vecs = _stacked(chunk, 2, dim, "the database")
            values = {}
            if "labels" in extras:
                labels: dict[int, list] = {}
                for image_id, label, score in conn.exec_driver_sql(
                    "SELECT image_id, label, score FROM labels WHERE image_id BETWEEN ? AND ? "
                    "ORDER BY image_id, rank",
                    (first, last),
                ):
                    labels.setdefault(image_id, []).append((label, round(float(score), 6)))
                values["labels"] = [labels.get(i) for i in ids.tolist()]
            if "cluster" in extras:
                clusters = dict(
                    conn.exec_driver_sql(
                        "SELECT image_id, cluster FROM clusters WHERE image_id BETWEEN ? AND ?",
                        (first, last),
                    ).all()
                )
                values["cluster"] = [clusters.get(i) for i in ids.tolist()]
            yield ids, [from_column(r[1]) for r in chunk], vecs.astype(np.float32), values

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
            for chunk in _chunks(list(rows), ROWS_PER_STATEMENT):
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
            for chunk in _chunks(list(rows), ROWS_PER_STATEMENT):
                session.execute(update(ImageRow), [dict(id=i, device=d) for i, d in chunk])

    def _has_facts_columns(self) -> bool:
        """Whether the images table has the format column (a reader may open an index made
        before it, on storage it cannot migrate)."""
        if self._facts_columns is None and self.schema_version >= 1:
            self._facts_columns = True
        if self._facts_columns is None:
            with self.engine.connect() as conn:
                self._facts_columns = "format" in _columns(conn, "images")
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

    def _rows_by_id(self, select: str, column: str, ids: Sequence[int] | np.ndarray) -> list[tuple]:
        """Run `select ... WHERE column IN (ids)` in chunks under SQLite's variable limit,
        as plain SQL (these run on every search, where the ORM costs more than SQLite)."""
        rows: list[tuple] = []
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                marks = ",".join("?" * len(chunk))
                sql = f"{select} WHERE {column} IN ({marks})"
                rows += conn.exec_driver_sql(sql, tuple(chunk)).all()
        return rows

    def id_summary(self) -> tuple[int, int | None, int | None]:
        """Return (count, smallest id, largest id) of the stored vectors, from the id index."""
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT count(*), min(image_id), max(image_id) FROM vectors"
            ).one()
        return int(row[0]), row[1], row[2]

    def vector_ids(self) -> np.ndarray:
        """Return the ids of every image with a vector, sorted: from the id index, through
        the driver's cursor in blocks (10M ids in ~5 s, no Python list of ten million)."""
        raw = self.engine.raw_connection()
        try:
            assert raw.driver_connection is not None  # the sqlite3 connection, open
            cursor = raw.driver_connection.execute("SELECT image_id FROM vectors ORDER BY image_id")
            blocks = []
            while rows := cursor.fetchmany(100_000):
                blocks.append(np.fromiter(chain.from_iterable(rows), np.int64, len(rows)))
            return np.concatenate(blocks) if blocks else np.empty(0, np.int64)
        finally:
            raw.close()

    # -- writing -------------------------------------------------------------------------

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
            _delete_labels(session, [*stale, *bad_ids])
            # A new vector (or none) was not part of the last clustering: its image waits,
            # unassigned, for the next `cluster` run rather than keep a stale cluster.
            _drop_clusters(session, [*stale, *bad_ids])
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
            _bump_generation(session)
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
            for chunk in _chunks(ids):
                removed += session.execute(delete(ImageRow).where(ImageRow.id.in_(chunk))).rowcount  # type: ignore[attr-defined]
            _bump_generation(session)
            crash_point("prune")
        return removed

    def reset_vectors(self, ids: Sequence[int], reason: str) -> None:
        """Drop damaged vectors and mark their images to be embedded again by the next run."""
        with Session(self.engine) as session, session.begin():
            _drop_clusters(session, [int(i) for i in ids])
            for image_id in ids:
                session.execute(delete(VectorRow).where(VectorRow.image_id == int(image_id)))
                session.execute(
                    update(ImageRow)
                    .where(ImageRow.id == int(image_id))
                    .values(status=STATUS_ERROR, error=reason, size=-1)
                )
            _bump_generation(session)

    # -- labels --------------------------------------------------------------------------

    def label_source(self) -> dict | None:
        """Return what made the stored labels (model, weights_sha256, revision, top), or None
        when the index has no labels."""
        text = self._get_meta("labels")
        return None if text is None else json.loads(text)

    def unlabelled(self) -> list[tuple[int, str, str | None]]:
        """Return (id, path, sha256) of every image with a vector and no labels, by id."""
        with self.engine.connect() as conn:
            return [
                (i, from_column(path), sha)
                for i, path, sha in conn.exec_driver_sql(
                    "SELECT i.id, i.path, i.sha256 FROM images i JOIN vectors v "
                    "ON v.image_id = i.id WHERE NOT EXISTS (SELECT 1 FROM labels l "
                    "WHERE l.image_id = i.id) ORDER BY i.id"
                )
            ]

    def labelled_count(self) -> int:
        """Return the number of images with stored labels (0 for indexes made before them)."""
        if not self._has_labels():
            return 0
        with self.engine.connect() as conn:
            return int(
                conn.exec_driver_sql("SELECT count(*) FROM labels WHERE rank = 1").scalar_one()
            )

    def write_labels(self, labels: dict[int, Sequence[Label]], source: dict) -> None:
        """Store the labels of some images, replacing theirs, and what made them, in one
        transaction. Images deleted meanwhile are skipped."""
        with Session(self.engine) as session, session.begin():
            ids = list(labels)
            live: set[int] = set()
            for chunk in _chunks(ids):
                live.update(session.scalars(select(ImageRow.id).where(ImageRow.id.in_(chunk))))
            _delete_labels(session, ids)
            rows = [
                dict(image_id=i, rank=rank, label=lab.label, score=float(lab.score))
                for i, found in labels.items()
                if i in live
                for rank, lab in enumerate(found, 1)
            ]
            for chunk in _chunks(rows, ROWS_PER_STATEMENT):
                session.execute(insert(LabelRow).values(chunk))
            _put_meta(session, "labels", json.dumps(source, sort_keys=True))
            crash_point("labels")

    def clear_labels(self) -> None:
        """Delete every stored label and the record of what made them."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(LabelRow))
            session.execute(delete(MetaRow).where(MetaRow.key == "labels"))

    def label_names(self) -> list[str]:
        """Return every distinct stored label (from the label index, not the table)."""
        if not self._has_labels():
            return []
        with self.engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT DISTINCT label FROM labels")]

    def ids_with_labels(self, names: Sequence[str]) -> np.ndarray:
        """Return the sorted ids of the images having any of `names` among their labels."""
        found: list[int] = []
        with self.engine.connect() as conn:
            for chunk in _chunks(list(names)):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT image_id FROM labels WHERE label IN ({marks})"
                found += [r[0] for r in conn.exec_driver_sql(sql, tuple(chunk))]
        return np.unique(np.asarray(found, dtype=np.int64))

    def labels_of(self, ids: Sequence[int]) -> dict[int, list[Label]]:
        """Return id -> stored labels, best first, for each of `ids` that has some."""
        if not self._has_labels():
            return {}
        out: dict[int, list[Label]] = {}
        rows = self._rows_by_id("SELECT image_id, rank, label, score FROM labels", "image_id", ids)
        for image_id, _, label, score in sorted(rows):
            out.setdefault(int(image_id), []).append(Label(label, float(score)))
        return out

    def _has_labels(self) -> bool:
        """Return True when the labels table exists: an index made before labels lacks it
        until it is migrated (read-only storage), and readers treat that as no labels."""
        if self.schema_version >= 1:
            return True
        with self.engine.connect() as conn:
            return _table_exists(conn, "labels")

    # -- clusters ------------------------------------------------------------------------
    # Readers call these only when the meta row "clustering" exists: an index made before
    # clusters existed has no clusters table until it is migrated (storage/schema.py).

    def replace_clusters(
        self, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, run: str
    ) -> None:
        """Replace every image's cluster, and the run's description (JSON), in one
        transaction. Vectors are unchanged, so the generation (and the FAISS file) stays."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM clusters")
            for start in range(0, len(ids), FETCH_ROWS):
                end = start + FETCH_ROWS
                rows = zip(
                    ids[start:end].tolist(),
                    labels[start:end].tolist(),
                    np.round(scores[start:end].astype(np.float64), 6).tolist(),
                    strict=True,
                )
                conn.exec_driver_sql(
                    "INSERT INTO clusters (image_id, cluster, score) VALUES (?, ?, ?)", list(rows)
                )
            _put_meta(conn, "clustering", run)
            crash_point("clusters")

    def clusters_of(self, ids: Sequence[int]) -> dict[int, tuple[int, float]]:
        """Return id -> (cluster, score) for each of `ids` that has one."""
        if self.clustering() is None:
            return {}
        rows = self._rows_by_id("SELECT image_id, cluster, score FROM clusters", "image_id", ids)
        return {int(i): (int(c), float(sc)) for i, c, sc in rows}

    def restore_clusters(self, rows: Sequence[tuple[int, int, float]]) -> None:
        """Give images back the (image id, cluster, score) they had in the current run."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT OR REPLACE INTO clusters (image_id, cluster, score) VALUES (?, ?, ?)",
                [tuple(r) for r in rows],
            )

    def clustering(self) -> dict | None:
        """Return the last clustering run's description, or None if there was none."""
        text = self._get_meta("clustering")
        return None if text is None else json.loads(text)

    def clusters(self, top: int) -> list[tuple[int, int, float, list[tuple[int, str, float]]]]:
        """Return (cluster, size, mean score, [(id, path, score)] of its `top` best) for
        each cluster with images, in cluster order, from one snapshot of the database."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # one snapshot, even while a new run commits
            try:
                sizes = conn.exec_driver_sql(
                    "SELECT cluster, count(*), avg(score) FROM clusters "
                    "GROUP BY cluster ORDER BY cluster"
                ).all()
                result = []
                for cluster, size, mean in sizes:
                    best = conn.exec_driver_sql(
                        "SELECT c.image_id, i.path, c.score FROM clusters c "
                        "JOIN images i ON i.id = c.image_id WHERE c.cluster = ? "
                        "ORDER BY c.score DESC, c.image_id LIMIT ?",
                        (cluster, top),
                    ).all()
                    hits = [(i, from_column(p), score) for i, p, score in best]
                    result.append((int(cluster), int(size), float(mean), hits))
                return result
            finally:
                conn.exec_driver_sql("ROLLBACK")

    def cluster_members(self, cluster: int) -> np.ndarray:
        """Return the ids of the images in `cluster`, sorted."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT image_id FROM clusters WHERE cluster = ? ORDER BY image_id", (cluster,)
            ).all()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def cluster_hits(self, cluster: int) -> list[tuple[int, str, float]]:
        """Return (id, path, score) of every image in `cluster`, nearest its centre first."""
        with self.engine.connect() as conn:
            return [
                (i, from_column(path), score)
                for i, path, score in conn.exec_driver_sql(
                    "SELECT c.image_id, i.path, c.score FROM clusters c "
                    "JOIN images i ON i.id = c.image_id WHERE c.cluster = ? "
                    "ORDER BY c.score DESC, c.image_id",
                    (cluster,),
                )
            ]

    def clustered_count(self) -> int:
        """Return how many images have a cluster."""
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM clusters").scalar_one())

    # -- checking ------------------------------------------------------------------------

    def check(self, dim: int) -> StoreReport:
        """Check every invariant the database must keep; return what is wrong and where."""
        report = StoreReport()
        with Session(self.engine) as session:
            result = list(session.execute(text("PRAGMA integrity_check")).scalars())
            if result != ["ok"]:
                report.problems.append("SQLite integrity check failed: " + "; ".join(result[:5]))
                report.corrupt = True
                return report
            report.unvectored = list(
                session.scalars(
                    select(ImageRow.id)
                    .outerjoin(VectorRow, VectorRow.image_id == ImageRow.id)
                    .where(ImageRow.status == STATUS_OK, VectorRow.image_id.is_(None))
                )
            )
            report.stray = list(
                session.scalars(
                    select(VectorRow.image_id)
                    .outerjoin(ImageRow, VectorRow.image_id == ImageRow.id)
                    .where(or_(ImageRow.id.is_(None), ImageRow.status != STATUS_OK))
                )
            )
            report.damaged = list(
                session.scalars(
                    select(VectorRow.image_id).where(func.length(VectorRow.vector) != 4 * dim)
                )
            )
        skip = set(report.damaged) | set(report.stray)
        for ids, vecs in self.iter_vectors(dim, skip=skip):
            norms = np.linalg.norm(vecs, axis=1)
            wrong = ~np.isfinite(norms) | (np.abs(norms - 1) > 1e-3)
            report.damaged.extend(int(i) for i in ids[wrong])
        if report.unvectored:
            report.problems.append(f"{len(report.unvectored)} images marked indexed have no vector")
        if report.stray:
            report.problems.append(f"{len(report.stray)} vectors belong to no indexed image")
        if report.damaged:
            report.problems.append(
                f"{len(report.damaged)} vectors are damaged "
                f"(not {dim} finite values of unit length)"
            )
        return report

    def delete_vectors(self, ids: Sequence[int]) -> None:
        """Delete the vectors of `ids` (stray vectors of failed or missing images)."""
        with Session(self.engine) as session, session.begin():
            _drop_clusters(session, [int(i) for i in ids])
            for chunk in _chunks([int(i) for i in ids]):
                session.execute(delete(VectorRow).where(VectorRow.image_id.in_(chunk)))
            _bump_generation(session)


@dataclass
class StoreReport:
    """What `Store.check` found."""

    problems: list[str] = field(default_factory=list)
    corrupt: bool = False  # SQLite itself is damaged: nothing can be trusted
    unvectored: list[int] = field(default_factory=list)  # status ok, but no vector
    stray: list[int] = field(default_factory=list)  # vector of a failed or missing image
    damaged: list[int] = field(default_factory=list)  # wrong length, not finite, not unit


# Rows per multi-row statement: 9 columns x 100 rows stays far below SQLite's limit on bound
# variables, and one statement per 100 rows costs a fraction of one per row.
ROWS_PER_STATEMENT = 100

# Ids per `IN (...)` list, under SQLite's limit on bound variables.
IDS_PER_STATEMENT = 500


def _columns(conn, table: str) -> set[str]:
    return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}


def _table_exists(conn, table: str) -> bool:
    """Return True when `table` exists: older indexes lack newer tables until a write."""
    found = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).first()
    return found is not None


def _has_rows(conn, table: str) -> bool:
    """Return True when `table` exists and has a row."""
    if not _table_exists(conn, table):
        return False
    return conn.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 1").first() is not None


def _chunks(items: Sequence, size: int = IDS_PER_STATEMENT) -> Iterator[Sequence]:
    """Yield consecutive slices of `items`, each at most `size` long."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    for chunk in _chunks(rows, ROWS_PER_STATEMENT):
        stmt = insert(ImageRow).values(chunk)
        upsert = stmt.on_conflict_do_update(
            index_elements=["path"],
            set_={c: stmt.excluded[c] for c in rows[0] if c != "path"},
        ).returning(ImageRow.id, ImageRow.path)
        ids.update({path: int(i) for i, path in session.execute(upsert)})
    return ids


def _upsert_vectors(session: Session, ids: list[int], vectors: np.ndarray) -> None:
    rows = [dict(image_id=i, vector=v.tobytes()) for i, v in zip(ids, vectors, strict=True)]
    for chunk in _chunks(rows, ROWS_PER_STATEMENT):
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
    for chunk in _chunks(list(new_sha)):
        rows = session.execute(
            select(ImageRow.id, ImageRow.path, ImageRow.sha256).where(ImageRow.path.in_(chunk))
        )
        stale += [i for i, path, sha in rows if sha is None or sha != new_sha[path]]
    return stale


def _delete_labels(session: Session, ids: Sequence[int]) -> None:
    for chunk in _chunks([int(i) for i in ids]):
        session.execute(delete(LabelRow).where(LabelRow.image_id.in_(chunk)))


def _drop_clusters(session: Session, ids: list[int]) -> None:
    """Forget the cluster of `ids` (their vectors are replaced or gone)."""
    for chunk in _chunks(ids):
        session.execute(delete(ClusterRow).where(ClusterRow.image_id.in_(chunk)))


def _put_meta(session: Session | Connection, key: str, value: str) -> None:
    session.execute(
        insert(MetaRow)
        .values(key=key, value=value)
        .on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )


def _vector_of(image_id, blob: bytes, dim: int | None, where: str) -> np.ndarray:
    if len(blob) % 4 or (dim is not None and len(blob) != 4 * dim):
        raise _damaged_vector(image_id, len(blob), dim, where)
    return np.frombuffer(blob, dtype="<f4")


def _generation(value: str | None, key: str, where: str) -> int:
    """The generation number stored under `key`, or IndexFormatError if it is not one."""
    try:
        return int(value or 0)
    except ValueError:
        assert value is not None  # int(None or 0) is 0: only a value fails
        raise IndexFormatError(
            f"{where} is damaged: its {key} is {value[:40]!r}, not a number; run `simsearch repair`"
        ) from None


def _damaged_vector(image_id, size: int, dim: int | None, where: str) -> IndexFormatError:
    wanted = f", not {4 * dim}" if dim else ""
    return IndexFormatError(
        f"{where} is damaged: the stored vector of image {image_id} is {size} bytes{wanted}; "
        "run `simsearch repair` (it marks the image to be embedded again)"
    )


def _stacked(chunk, column: int, dim: int, where: str) -> np.ndarray:
    """The vectors in `column` of database rows (id first) as one (n, dim) array."""
    for row in chunk:
        if len(row[column]) != 4 * dim:
            raise _damaged_vector(row[0], len(row[column]), dim, where)
    return np.frombuffer(b"".join(r[column] for r in chunk), dtype="<f4").reshape(-1, dim)


def _bump_generation(session: Session) -> None:
    current = session.scalar(select(MetaRow.value).where(MetaRow.key == "generation"))
    _put_meta(session, "generation", str(int(current or 0) + 1))


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
