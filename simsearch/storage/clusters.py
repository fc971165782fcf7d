"""The Store's clusters table: each image's cluster in the last `cluster` run, and the
run's description (meta["clustering"]). Vectors are unchanged, so the generation stays."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from sqlalchemy import delete
from sqlalchemy.orm import Session

from simsearch.fs.faults import crash_point
from simsearch.fs.names import from_column
from simsearch.storage.base import FETCH_ROWS, StoreBase, chunks, put_meta
from simsearch.storage.schema import ClusterRow


class ClustersPart(StoreBase):
    """The clusters table.

    Readers call these only when the meta row "clustering" exists: an index made before
    clusters existed has no clusters table until it is migrated (storage/schema.py).
    """

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
            put_meta(conn, "clustering", run)
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


def drop_clusters(session: Session, ids: list[int]) -> None:
    """Forget the cluster of `ids` (their vectors are replaced or gone)."""
    for chunk in chunks(ids):
        session.execute(delete(ClusterRow).where(ClusterRow.image_id.in_(chunk)))
