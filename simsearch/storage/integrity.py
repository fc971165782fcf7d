"""The Store's checks and repairs: every invariant the database must keep (`verify`), and
the writes `repair` makes to restore them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, func, or_, select, update

from simsearch.storage.base import FETCH_ROWS, IMAGES, VECTORS, StoreBase, bump_generation, chunks
from simsearch.storage.clusters import drop_clusters
from simsearch.storage.images import STATUS_ERROR, STATUS_OK
from simsearch.storage.vectors import iter_vector_chunks


@dataclass
class StoreReport:
    """What `Store.check` found."""

    problems: list[str] = field(default_factory=list)
    corrupt: bool = False  # SQLite itself is damaged: nothing can be trusted
    unvectored: list[int] = field(default_factory=list)  # status ok, but no vector
    stray: list[int] = field(default_factory=list)  # vector of a failed or missing image
    damaged: list[int] = field(default_factory=list)  # wrong length, not finite, not unit


class IntegrityPart(StoreBase):
    """What `verify` checks and `repair` fixes."""

    def check(self, dim: int) -> StoreReport:
        """Check every invariant the database must keep; return what is wrong and where."""
        report = StoreReport()
        with self.engine.connect() as conn:
            # A PRAGMA has no Core form: driver SQL.
            result = list(conn.exec_driver_sql("PRAGMA integrity_check").scalars())
            if result != ["ok"]:
                report.problems.append("SQLite integrity check failed: " + "; ".join(result[:5]))
                report.corrupt = True
                return report
            report.unvectored = list(
                conn.scalars(
                    select(IMAGES.c.id)
                    .select_from(IMAGES.outerjoin(VECTORS, VECTORS.c.image_id == IMAGES.c.id))
                    .where(IMAGES.c.status == STATUS_OK, VECTORS.c.image_id.is_(None))
                )
            )
            report.stray = list(
                conn.scalars(
                    select(VECTORS.c.image_id)
                    .select_from(VECTORS.outerjoin(IMAGES, VECTORS.c.image_id == IMAGES.c.id))
                    .where(or_(IMAGES.c.id.is_(None), IMAGES.c.status != STATUS_OK))
                )
            )
            report.damaged = list(
                conn.scalars(
                    select(VECTORS.c.image_id).where(func.length(VECTORS.c.vector) != 4 * dim)
                )
            )
        skip = set(report.damaged) | set(report.stray)
        for ids, vecs in iter_vector_chunks(self.engine, dim, FETCH_ROWS, skip, self.path.name):
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
        with self.engine.begin() as conn:
            drop_clusters(conn, [int(i) for i in ids])
            for chunk in chunks([int(i) for i in ids]):
                conn.execute(delete(VECTORS).where(VECTORS.c.image_id.in_(chunk)))
            bump_generation(conn)

    def reset_vectors(self, ids: Sequence[int], reason: str) -> None:
        """Drop damaged vectors and mark their images to be embedded again by the next run."""
        with self.engine.begin() as conn:
            drop_clusters(conn, [int(i) for i in ids])
            for image_id in ids:
                conn.execute(delete(VECTORS).where(VECTORS.c.image_id == int(image_id)))
                conn.execute(
                    update(IMAGES)
                    .where(IMAGES.c.id == int(image_id))
                    .values(status=STATUS_ERROR, error=reason, size=-1)
                )
            bump_generation(conn)
