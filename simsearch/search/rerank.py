"""Exact scores from the vectors stored in the database (for search.cache): a small subset
of ids ranked exactly, and the candidates of an approximate search re-ranked."""

from __future__ import annotations

import numpy as np

from simsearch.storage.store import Store


def rank_subset(
    store: Store, queries: np.ndarray, within: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over the stored vectors of a small subset of ids."""
    stored = store.vectors_by_id(within)
    k = min(k, len(stored))
    if k == 0:
        empty = np.empty((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    ids = np.fromiter(stored, dtype=np.int64, count=len(stored))
    scores = queries @ np.stack(list(stored.values())).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def rank_candidates(
    store: Store, queries: np.ndarray, candidates: list[list[int]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank each query's candidate ids by exact scores on their stored vectors."""
    stored = store.vectors_by_id(sorted(set().union(*candidates)))
    k = min(k, max((len(c) for c in candidates), default=0))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (query, found) in enumerate(zip(queries, candidates, strict=True)):
        found = [i for i in found if i in stored]
        if not found:
            continue
        exact = np.stack([stored[i] for i in found]) @ query
        best = np.argsort(-exact, kind="stable")[:k]
        scores[row, : len(best)] = exact[best]
        ids[row, : len(best)] = np.asarray(found)[best]
    return scores, ids
