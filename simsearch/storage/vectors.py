"""The Store's vectors table: each indexed image's vector, a little-endian float32 blob,
read by id, streamed out in id order, or read whole from one snapshot (export)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import cast

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from simsearch.errors import IndexFormatError
from simsearch.fs.names import from_column
from simsearch.storage.base import FETCH_ROWS, StoreBase, has_rows
from simsearch.storage.schema import ImageRow, VectorRow


class VectorsPart(StoreBase):
    """The vectors table (and the images' paths and labels an export reads with them)."""

    def vector_hashes(self) -> dict[str, int]:
        """Return content hash -> id of an image with that content and a vector."""
        stmt = (
            select(ImageRow.sha256, ImageRow.id)
            .join(VectorRow, VectorRow.image_id == ImageRow.id)
            .where(ImageRow.sha256.is_not(None))
        )
        with Session(self.engine) as session:  # (sha256 IS NOT NULL: a str)
            return {cast(str, sha): i for sha, i in session.execute(stmt)}

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
        return iter_vector_chunks(self.engine, dim, rows, skip, self.path.name)

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
                    if has_rows(conn, table)
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


def iter_vector_chunks(
    engine: Engine, dim: int, rows: int, skip: set[int] | None, where: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`Store.iter_vectors` of the database at `engine` (named `where` in errors)."""
    last = -1
    with Session(engine) as session:
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
            vecs = _stacked(chunk, 1, dim, where)
            yield ids, vecs.astype(np.float32, copy=False)


def _vector_of(image_id, blob: bytes, dim: int | None, where: str) -> np.ndarray:
    if len(blob) % 4 or (dim is not None and len(blob) != 4 * dim):
        raise _damaged_vector(image_id, len(blob), dim, where)
    return np.frombuffer(blob, dtype="<f4")


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
