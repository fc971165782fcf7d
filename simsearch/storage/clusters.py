"""The Store's clusters table: each image's cluster in the last `cluster` run, and the
run's description (meta["clustering"]). Vectors are unchanged, so the generation stays."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from sqlalchemy import Connection, Select, delete, func, insert, select

from simsearch.fs.faults import crash_point
from simsearch.storage.base import CLUSTERS, FETCH_ROWS, IMAGES, StoreBase, by_ids, chunks, put_meta

_CLUSTERS_OF = by_ids(
    select(CLUSTERS.c.image_id, CLUSTERS.c.cluster, CLUSTERS.c.score), CLUSTERS.c.image_id
)
# (id, path, score) of a cluster's images, nearest its centre first.
_HITS: Select = (
    select(CLUSTERS.c.image_id, IMAGES.c.path, CLUSTERS.c.score)
    .join_from(CLUSTERS, IMAGES, IMAGES.c.id == CLUSTERS.c.image_id)
    .order_by(CLUSTERS.c.score.desc(), CLUSTERS.c.image_id)
)


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
            conn.execute(delete(CLUSTERS))
            for start in range(0, len(ids), FETCH_ROWS):
                end = start + FETCH_ROWS
                rows = zip(
                    ids[start:end].tolist(),
                    labels[start:end].tolist(),
                    np.round(scores[start:end].astype(np.float64), 6).tolist(),
                    strict=True,
                )
                conn.execute(
                    insert(CLUSTERS),
                    [dict(image_id=i, cluster=c, score=s) for i, c, s in rows],
                )
            put_meta(conn, "clustering", run)
            crash_point("clusters")

    def clusters_of(self, ids: Sequence[int]) -> dict[int, tuple[int, float]]:
        """Return id -> (cluster, score) for each of `ids` that has one."""
        if self.clustering() is None:
            return {}
        rows = self._rows_by_id(_CLUSTERS_OF, ids)
        return {int(i): (int(c), float(sc)) for i, c, sc in rows}

    def restore_clusters(self, rows: Sequence[tuple[int, int, float]]) -> None:
        """Give images back the (image id, cluster, score) they had in the current run."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(CLUSTERS).prefix_with("OR REPLACE"),
                [dict(image_id=i, cluster=c, score=s) for i, c, s in rows],
            )

    def clustering(self) -> dict | None:
        """Return the last clustering run's description, or None if there was none."""
        text = self._get_meta("clustering")
        return None if text is None else json.loads(text)

    def clusters(self, top: int) -> list[tuple[int, int, float, list[tuple[int, str, float]]]]:
        """Return (cluster, size, mean score, [(id, path, score)] of its `top` best) for
        each cluster with images, in cluster order, from one snapshot of the database."""
        with self.engine.connect() as conn:
            # One snapshot, even while a new run commits: pysqlite runs SELECTs outside
            # transactions, and transaction control has no Core statement (driver SQL).
            conn.exec_driver_sql("BEGIN")
            try:
                sizes = conn.execute(
                    select(CLUSTERS.c.cluster, func.count(), func.avg(CLUSTERS.c.score))
                    .group_by(CLUSTERS.c.cluster)
                    .order_by(CLUSTERS.c.cluster)
                ).all()
                result = []
                for cluster, size, mean in sizes:
                    best = conn.execute(_HITS.where(CLUSTERS.c.cluster == cluster).limit(top)).all()
                    hits = [(i, p, score) for i, p, score in best]
                    result.append((int(cluster), int(size), float(mean), hits))
                return result
            finally:
                conn.exec_driver_sql("ROLLBACK")

    def cluster_members(self, cluster: int) -> np.ndarray:
        """Return the ids of the images in `cluster`, sorted."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CLUSTERS.c.image_id)
                .where(CLUSTERS.c.cluster == cluster)
                .order_by(CLUSTERS.c.image_id)
            ).all()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def cluster_hits(self, cluster: int) -> list[tuple[int, str, float]]:
        """Return (id, path, score) of every image in `cluster`, nearest its centre first."""
        with self.engine.connect() as conn:
            return [
                (i, path, score)
                for i, path, score in conn.execute(_HITS.where(CLUSTERS.c.cluster == cluster))
            ]

    def clustered_count(self) -> int:
        """Return how many images have a cluster."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(CLUSTERS)).scalar_one())


def drop_clusters(conn: Connection, ids: list[int]) -> None:
    """Forget the cluster of `ids` (their vectors are replaced or gone)."""
    for chunk in chunks(ids):
        conn.execute(delete(CLUSTERS).where(CLUSTERS.c.image_id.in_(chunk)))
