"""The index run's writes to the Store: a batch of embedded, failed and moved files, a
prune, and the facts of unchanged files read again. Each is one transaction; those that
change vectors also bump the generation (the FAISS file is then stale)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from sqlalchemy import Connection, bindparam, delete, select, update
from sqlalchemy.dialects.sqlite import insert

from simsearch.fs.faults import crash_point
from simsearch.storage.base import (
    IMAGES,
    ROWS_PER_STATEMENT,
    VECTORS,
    StoreBase,
    bump_generation,
    chunks,
)
from simsearch.storage.checks import check_vectors
from simsearch.storage.clusters import drop_clusters
from simsearch.storage.images import STATUS_ERROR, STATUS_OK, BadImage, GoodImage, Moved
from simsearch.storage.labels import delete_labels

# An update of the row whose id is the parameter "row_id"; run with a list of parameter
# sets (one statement, many rows), it sets the columns the sets name (set_header_facts).
_UPDATE_BY_ID = update(IMAGES).where(IMAGES.c.id == bindparam("row_id"))


class WritesPart(StoreBase):
    """The index run's writes."""

    def set_header_facts(self, rows: Sequence[tuple[int, int, int, str | None, bool]]) -> None:
        """Record (id, width, height, format, lossless) read from files' headers. No vector
        changes, so the generation stays (the FAISS file stays current)."""
        if not rows:
            return
        with self.engine.begin() as conn:
            for chunk in chunks(list(rows), ROWS_PER_STATEMENT):
                conn.execute(
                    _UPDATE_BY_ID,
                    [
                        dict(row_id=i, width=w, height=h, format=f, lossless=int(bool(lossless)))
                        for i, w, h, f, lossless in chunk
                    ],
                )

    def set_devices(self, rows: Sequence[tuple[int, int]]) -> None:
        """Record (id, st_dev) for files whose file system has another number now."""
        if not rows:
            return
        with self.engine.begin() as conn:
            for chunk in chunks(list(rows), ROWS_PER_STATEMENT):
                conn.execute(_UPDATE_BY_ID, [dict(row_id=i, device=d) for i, d in chunk])

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
        with self.engine.begin() as conn:
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
            stale = _changed_content(conn, good)
            id_of = _upsert_images(conn, ok_rows)
            ids = [id_of[img.path] for img in good]
            _upsert_vectors(conn, ids, vectors)
            bad_rows = [_image_row(img, now, status=STATUS_ERROR, error=img.error) for img in bad]
            bad_ids = list(_upsert_images(conn, bad_rows).values())
            dropped = list(
                conn.scalars(select(VECTORS.c.image_id).where(VECTORS.c.image_id.in_(bad_ids)))
            )
            if dropped:
                conn.execute(delete(VECTORS).where(VECTORS.c.image_id.in_(dropped)))
            delete_labels(conn, [*stale, *bad_ids])
            # A new vector (or none) was not part of the last clustering: its image waits,
            # unassigned, for the next `cluster` run rather than keep a stale cluster.
            drop_clusters(conn, [*stale, *bad_ids])
            for move in moves:
                conn.execute(
                    update(IMAGES)
                    .where(IMAGES.c.id == move.id)
                    .values(
                        path=move.path,
                        size=move.size,
                        mtime_ns=move.mtime_ns,
                        device=move.device,
                        indexed_at=now,
                    )
                )
            bump_generation(conn)
            crash_point("commit")
        return ids, dropped

    def remove_images(self, ids: Sequence[int]) -> int:
        """Delete images (and their vectors and labels) in one transaction; returns how many
        there were."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self.engine.begin() as conn:
            removed = 0
            for chunk in chunks(ids):
                removed += conn.execute(delete(IMAGES).where(IMAGES.c.id.in_(chunk))).rowcount
            bump_generation(conn)
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


def _upsert_images(conn: Connection, rows: list[dict]) -> dict[str, int]:
    """Insert image rows, or update those whose path exists; return path -> id."""
    ids: dict[str, int] = {}
    for chunk in chunks(rows, ROWS_PER_STATEMENT):
        stmt = insert(IMAGES).values(chunk)
        upsert = stmt.on_conflict_do_update(
            index_elements=["path"],
            set_={c: stmt.excluded[c] for c in rows[0] if c != "path"},
        ).returning(IMAGES.c.id, IMAGES.c.path)
        ids.update({path: int(i) for i, path in conn.execute(upsert)})
    return ids


def _upsert_vectors(conn: Connection, ids: list[int], vectors: np.ndarray) -> None:
    rows = [dict(image_id=i, vector=v.tobytes()) for i, v in zip(ids, vectors, strict=True)]
    for chunk in chunks(rows, ROWS_PER_STATEMENT):
        stmt = insert(VECTORS).values(chunk)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["image_id"], set_={"vector": stmt.excluded.vector}
            )
        )


def _changed_content(conn: Connection, good: Sequence[GoodImage]) -> list[int]:
    """Return the ids of stored paths among `good` whose content (SHA-256) is new."""
    new_sha = {img.path: img.sha256 for img in good}
    stale = []
    for chunk in chunks(list(new_sha)):
        rows = conn.execute(
            select(IMAGES.c.id, IMAGES.c.path, IMAGES.c.sha256).where(IMAGES.c.path.in_(chunk))
        )
        stale += [i for i, path, sha in rows if sha is None or sha != new_sha[path]]
    return stale
