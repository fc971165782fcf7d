"""An index's clusters: running k-means over its vectors (ops.cluster), and reading back the
stored clustering."""

from __future__ import annotations

import dataclasses
import json

from simsearch.config import CLUSTER_TOP
from simsearch.errors import QueryError
from simsearch.ops.cluster import check_k, cluster_vectors
from simsearch.ops.parts import IndexParts
from simsearch.progress import Progress
from simsearch.records import Cluster, ClusterRun, Hit, hit_score


def cluster(
    parts: IndexParts, k: int | str, *, seed: int = 0, progress: Progress | None = None
) -> ClusterRun:
    """Cluster every indexed image and store each one's cluster (see `Index.cluster`)."""
    store, dim = parts.store, parts.manifest.dim
    check_k(k, store.counts()[0])  # ClusterError before waiting for the lock
    with parts.writing():
        result = cluster_vectors(
            store.vector_ids(),
            store.vectors_by_id,
            lambda: store.iter_vectors(dim),
            dim,
            k,
            seed=seed,
            progress=progress,
        )
        store.replace_clusters(
            result.ids, result.labels, result.scores, json.dumps(dataclasses.asdict(result.run))
        )
    return result.run


def clustering(parts: IndexParts) -> ClusterRun | None:
    """Return how the stored clustering was made, or None if `cluster` never ran."""
    data = parts.store.clustering()
    if data is None:
        return None
    known = {f.name for f in dataclasses.fields(ClusterRun)}
    data = {key: value for key, value in data.items() if key in known}
    data["candidates"] = tuple(tuple(pair) for pair in data.get("candidates", ()))
    return ClusterRun(**data)


def clusters(parts: IndexParts, top: int = CLUSTER_TOP) -> list[Cluster]:
    """Return the stored clusters, 1 (the largest) first (see `Index.clusters`)."""
    if top < 0:
        raise QueryError("top must be at least 0")
    if clustering(parts) is None:
        return []
    return [
        Cluster(
            cluster,
            size,
            round(mean, 6),
            tuple(Hit(int(i), path, hit_score(s)) for i, path, s in best),
        )
        for cluster, size, mean, best in parts.store.clusters(top)
    ]


def cluster_members(parts: IndexParts, cluster: int) -> list[Hit]:
    """Return every image of `cluster`, nearest its centre first."""
    rows = parts.store.cluster_hits(check_cluster(parts, cluster))
    return [Hit(int(i), path, hit_score(s)) for i, path, s in rows]


def check_cluster(parts: IndexParts, cluster: int) -> int:
    """Return `cluster` as an int if the last clustering made it, else QueryError."""
    run = clustering(parts)
    if run is None:
        raise QueryError("this index has no clusters yet", fix="cluster")
    if isinstance(cluster, bool) or not 1 <= int(cluster) <= run.clusters:
        raise QueryError(
            f"no cluster {cluster}: the last clustering made clusters 1 to {run.clusters}"
        )
    return int(cluster)
