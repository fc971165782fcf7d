"""The Store's vectors table: each indexed image's vector, a little-endian float32 blob,
read by id, streamed out in id order, or read whole from one snapshot (export)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import cast

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, func, select

from simsearch.errors import IndexFormatError
from simsearch.storage.base import (
    CLUSTERS,
    FETCH_ROWS,
    IMAGES,
    LABELS,
    VECTORS,
    StoreBase,
    by_ids,
    has_rows,
)

# The reads of stored vectors that searches make, built once.
_VECTORS_BY_ID = by_ids(select(VECTORS.c.image_id, VECTORS.c.vector), VECTORS.c.image_id)
_VECTOR = select(VECTORS.c.vector).where(VECTORS.c.image_id == bindparam("image_id"))


class VectorsPart(StoreBase):
    """The vectors table (and the images' paths and labels an export reads with them)."""

    def vector_hashes(self) -> dict[str, int]:
        """Return content hash -> id of an image with that content and a vector."""
        stmt = (
            select(IMAGES.c.sha256, IMAGES.c.id)
            .join(VECTORS, VECTORS.c.image_id == IMAGES.c.id)
            .where(IMAGES.c.sha256.is_not(None))
        )
        with self.engine.connect() as conn:  # (sha256 IS NOT NULL: a str)
            return {cast(str, sha): i for sha, i in conn.execute(stmt)}

    def copy_sources(
        self, ids: Iterable[int]
    ) -> dict[int, tuple[np.ndarray, int, int, str | None]]:
        """Return id -> (vector, width, height, sha256) for images whose vector is reused."""
        stmt = (
            select(IMAGES.c.id, VECTORS.c.vector, IMAGES.c.width, IMAGES.c.height, IMAGES.c.sha256)
            .join(VECTORS, VECTORS.c.image_id == IMAGES.c.id)
            .where(IMAGES.c.id.in_([int(i) for i in ids]))
        )
        with self.engine.connect() as conn:
            return {
                i: (self._vector(i, blob).copy(), w or 0, h or 0, sha)
                for i, blob, w, h, sha in conn.execute(stmt)
            }

    def _vector(self, image_id, blob: bytes) -> np.ndarray:
        """A stored vector blob as float32, or IndexFormatError when it is damaged."""
        return _vector_of(image_id, blob, self.dim, self.path.name)

    def vectors_by_id(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """Return id -> stored vector for each of `ids` that has one."""
        rows = self._rows_by_id(_VECTORS_BY_ID, ids)
        return {int(i): self._vector(i, blob) for i, blob in rows}

    def vector(self, image_id: int) -> np.ndarray | None:
        """Return the stored vector of an image, or None when it has none."""
        with self.engine.connect() as conn:
            blob = conn.scalar(_VECTOR, {"image_id": image_id})
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
            # (Transaction control has no Core statement: the one use of driver SQL here.)
            conn.exec_driver_sql("BEGIN")
            try:
                total = conn.execute(select(func.count()).select_from(VECTORS)).scalar_one()
                extras = [
                    column
                    for column, table in (("labels", "labels"), ("cluster", "clusters"))
                    if has_rows(conn, table)
                ]
                yield int(total), extras, self._items(conn, dim, rows, extras)
            finally:
                conn.exec_driver_sql("ROLLBACK")

    @staticmethod
    def _items(conn: Connection, dim: int, rows: int, extras: list[str]) -> Iterator[tuple]:
        last = -1
        while True:
            chunk = conn.execute(
                select(VECTORS.c.image_id, IMAGES.c.path, VECTORS.c.vector)
                .join_from(VECTORS, IMAGES, IMAGES.c.id == VECTORS.c.image_id)
                .where(VECTORS.c.image_id > last)
                .order_by(VECTORS.c.image_id)
                .limit(rows)
            ).all()
            if not chunk:
                return
            first, last = int(chunk[0][0]), int(chunk[-1][0])
            ids = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))
            vecs = _stacked(chunk, 2, dim, "the database")
            values = {}
            if "labels" in extras:
                labels: dict[int, list] = {}
                for image_id, label, score in conn.execute(
                    select(LABELS.c.image_id, LABELS.c.label, LABELS.c.score)
                    .where(LABELS.c.image_id.between(first, last))
                    .order_by(LABELS.c.image_id, LABELS.c.rank)
                ):
                    labels.setdefault(image_id, []).append((label, round(float(score), 6)))
                values["labels"] = [labels.get(i) for i in ids.tolist()]
            if "cluster" in extras:
                clusters = dict(
                    conn.execute(
                        select(CLUSTERS.c.image_id, CLUSTERS.c.cluster).where(
                            CLUSTERS.c.image_id.between(first, last)
                        )
                    ).all()
                )
                values["cluster"] = [clusters.get(i) for i in ids.tolist()]
            yield ids, [r[1] for r in chunk], vecs.astype(np.float32), values

    def id_summary(self) -> tuple[int, int | None, int | None]:
        """Return (count, smallest id, largest id) of the stored vectors, from the id index."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(func.count(), func.min(VECTORS.c.image_id), func.max(VECTORS.c.image_id))
            ).one()
        return int(row[0]), row[1], row[2]

    def vector_ids(self) -> np.ndarray:
        """Return the ids of every image with a vector, sorted: from the id index, in blocks
        (10M ids in seconds, never a Python list of ten million)."""
        blocks = []
        with self.engine.connect() as conn:
            result = conn.execute(select(VECTORS.c.image_id).order_by(VECTORS.c.image_id))
            for rows in result.partitions(100_000):
                blocks.append(np.fromiter(chain.from_iterable(rows), np.int64, len(rows)))
        return np.concatenate(blocks) if blocks else np.empty(0, np.int64)


def iter_vector_chunks(
    engine: Engine, dim: int, rows: int, skip: set[int] | None, where: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`Store.iter_vectors` of the database at `engine` (named `where` in errors)."""
    last = -1
    with engine.connect() as conn:
        while True:
            stmt = (
                select(VECTORS.c.image_id, VECTORS.c.vector)
                .where(VECTORS.c.image_id > last)
                .order_by(VECTORS.c.image_id)
                .limit(rows)
            )
            chunk = conn.execute(stmt).all()
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
