"""Clusters: spherical k-means (FAISS) over the stored vectors, in bounded memory.

k-means trains on a random sample of the vectors (at most CLUSTER_TRAIN_MAX of them), from
seeds chosen by greedy k-means++; then every stored vector is assigned to its nearest
centroid a chunk at a time. Memory is the sample, one chunk, and 16 bytes per image for the
assignment, whatever the size of the collection. Clusters are numbered by size, 1 the
largest; an image's score is its cosine similarity to its cluster's centre.

`auto` picks K by the mean silhouette (cosine distance) of a sample: K from 2 to
CLUSTER_AUTO_MAX_K on a coarse grid, then every K between the best grid point's neighbours.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from simsearch.config import (
    CLUSTER_AUTO_MAX_K,
    CLUSTER_AUTO_SAMPLE,
    CLUSTER_ITERATIONS,
    CLUSTER_MAX_K,
    CLUSTER_SEED_PER_CENTROID,
    CLUSTER_SEED_TRIALS_PER_LOG_K,
    CLUSTER_SEEDINGS,
    CLUSTER_SEEDINGS_MAX_K,
    CLUSTER_SILHOUETTE_SAMPLE,
    CLUSTER_TRAIN_MAX,
    CLUSTER_TRAIN_MIN,
    CLUSTER_TRAIN_PER_CENTROID,
)
from simsearch.errors import ClusterError
from simsearch.progress import Progress, advance, describe, set_total
from simsearch.records import ClusterRun

log = logging.getLogger(__name__)

AUTO: Final = "auto"
AUTO_CRITERION = "auto: best mean silhouette (cosine) of a sample"

# Rows of stored vectors fetched per query when drawing the training sample.
SAMPLE_FETCH_ROWS = 10_000


@dataclass(frozen=True)
class Assignment:
    """A clustering of every stored vector: what the store keeps, and how it was made."""

    ids: np.ndarray  # int64 image ids
    labels: np.ndarray  # int32 cluster of each, 1..run.clusters (1 = the largest)
    scores: np.ndarray  # float32 cosine similarity of each to its cluster's centre
    run: ClusterRun


def check_k(k: int | str, n: int) -> int | Literal["auto"]:
    """Return `k` (an int, or AUTO) if `n` images can be split into that many clusters;
    raise ClusterError saying why not."""
    if n == 0:
        raise ClusterError("the index holds no images", fix="add-images")
    if isinstance(k, str):
        if k.strip().lower() != AUTO:
            try:
                k = int(k)
            except ValueError:
                raise ClusterError(f"k must be a number of clusters or 'auto', not {k!r}") from None
        elif n < 3:
            raise ClusterError(f"k auto needs at least 3 images to compare; the index has {n}")
        else:
            return AUTO
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ClusterError(f"k must be a number of clusters or 'auto', not {k!r}")
    k = int(k)
    if k < 2:
        raise ClusterError(f"k must be at least 2, not {k}")
    if k > n:
        raise ClusterError(f"k={k} is more clusters than the index has images ({n})")
    if k > CLUSTER_MAX_K:
        raise ClusterError(f"k={k} is more than simsearch makes ({CLUSTER_MAX_K:,})")
    return k


def training_size(n: int, k: int) -> int:
    """Vectors k-means trains on, for `k` clusters of `n` vectors."""
    wanted = max(CLUSTER_TRAIN_MIN, CLUSTER_TRAIN_PER_CENTROID * k)
    return min(n, CLUSTER_TRAIN_MAX, wanted)


def cluster_vectors(
    ids: np.ndarray,
    fetch: Callable[[np.ndarray], dict[int, np.ndarray]],
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    dim: int,
    k: int | str,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> Assignment:
    """Cluster every stored vector into `k` clusters (or AUTO: chosen by silhouette).

    `ids`: every stored id (sorted); `fetch(ids)` returns id -> vector for those that still
    exist; `chunks()` yields (ids, vectors) of all stored vectors. `progress`: tqdm-like,
    advanced once per image assigned.
    """
    started = time.monotonic()
    k = check_k(k, len(ids))
    rng = np.random.default_rng(seed)
    size = training_size(len(ids), CLUSTER_AUTO_MAX_K if k == AUTO else k)
    sample = sample_vectors(ids, size, fetch, dim, rng)
    if len(sample) < 2:
        raise ClusterError("the index changed while it was being read; run the command again")
    # The silhouette sample: a random subset of the training sample (which is in id order).
    probe = sample[rng.permutation(len(sample))[:CLUSTER_SILHOUETTE_SAMPLE]]
    similarity = probe @ probe.T
    candidates: tuple[tuple[int, float], ...] = ()
    if k == AUTO:
        _describe(progress, "choosing k")
        auto_sample = sample[rng.permutation(len(sample))[:CLUSTER_AUTO_SAMPLE]]
        k, candidates = choose_k(auto_sample, probe, similarity, rng)
        log.info("auto chose k=%d (silhouette %.3f)", k, dict(candidates)[k])
    chosen_by = AUTO_CRITERION if candidates else "given"
    k = min(k, len(sample))  # images removed meanwhile (the caller holds the write lock)
    log.info("training %d centroids on %d of %d vectors", k, len(sample), len(ids))
    _describe(progress, f"training {k} centroids")
    centroids = train(sample, k, rng)
    trained_on = len(sample)
    del sample
    _describe(progress, "assigning")
    set_total(progress, len(ids))
    got_ids, labels, scores = assign(chunks(), centroids, progress)
    labels, clusters = number_by_size(labels, k)
    run = ClusterRun(
        k=k,
        clusters=clusters,
        chosen_by=chosen_by,
        seed=seed,
        images=len(got_ids),
        trained_on=trained_on,
        iterations=CLUSTER_ITERATIONS,
        cohesion=round(float(scores.mean()) if len(scores) else 0.0, 6),
        silhouette=round(silhouette(similarity, np.argmax(probe @ centroids.T, axis=1)), 6),
        created_at=time.time(),
        seconds=round(time.monotonic() - started, 3),
        candidates=candidates,
    )
    return Assignment(got_ids, labels, scores, run)


def sample_vectors(
    ids: np.ndarray,
    size: int,
    fetch: Callable[[np.ndarray], dict[int, np.ndarray]],
    dim: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return `size` stored vectors drawn uniformly at random (all of them if fewer).

    Only the drawn rows are read, in id order, a chunk at a time.
    """
    if len(ids) > size:
        ids = np.sort(rng.choice(ids, size, replace=False))
    parts = []
    for start in range(0, len(ids), SAMPLE_FETCH_ROWS):
        chunk = ids[start : start + SAMPLE_FETCH_ROWS]
        found = fetch(chunk)
        rows = [found[i] for i in chunk.tolist() if i in found]  # some may be gone
        if rows:
            parts.append(np.stack(rows).astype(np.float32))
    return np.concatenate(parts) if parts else np.empty((0, dim), np.float32)


def train(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Return `k` unit centroids of the unit rows of `x` by spherical k-means."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=CLUSTER_ITERATIONS,
        spherical=True,
        seed=int(rng.integers(2**31)),
        # The sample is already drawn: FAISS must neither subsample it again nor warn
        # that a small index gives fewer than 39 images per cluster (that is the user's K).
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, len(x) // k + 1),
    )
    kmeans.train(x, init_centroids=seed_centroids(x, k, rng))
    assert kmeans.centroids is not None  # train sets them
    centroids = kmeans.centroids.astype(np.float32)
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def seed_centroids(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Return `k` rows of `x` to start k-means from: the best (lowest potential) of
    CLUSTER_SEEDINGS greedy k-means++ seedings (one past CLUSTER_SEEDINGS_MAX_K) on a
    subsample of CLUSTER_SEED_PER_CENTROID x k rows. None only where no potential is below
    infinity (NaN rows, which the store refuses): FAISS then seeds k-means itself."""
    m = min(len(x), CLUSTER_SEED_PER_CENTROID * k)
    subset = x[rng.choice(len(x), m, replace=False)] if m < len(x) else x
    best: np.ndarray | None = None
    best_potential = math.inf
    for _ in range(CLUSTER_SEEDINGS if k <= CLUSTER_SEEDINGS_MAX_K else 1):
        seeds, potential = _greedy_kmeans_pp(subset, k, rng)
        if potential < best_potential:
            best, best_potential = seeds, potential
    return best


def _greedy_kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Greedy k-means++ on unit rows (squared distance 2 - 2 cos): at each step draw a few
    candidates with probability proportional to their squared distance to the nearest seed,
    and keep the one that lowers the potential most. Returns (seeds, potential)."""
    n = len(x)
    trials = 2 + int(CLUSTER_SEED_TRIALS_PER_LOG_K * math.log(k))
    seeds = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(n))
    seeds[0] = x[first]
    closest = np.maximum(2 - 2 * (x @ x[first]), 0)
    for i in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        if cumulative[-1] <= 0:  # every row sits on a seed already (identical images)
            candidates = rng.integers(n, size=trials)
        else:
            draws = rng.random(trials) * cumulative[-1]
            candidates = np.minimum(np.searchsorted(cumulative, draws), n - 1)
        distances = np.maximum(2 - 2 * (x[candidates] @ x.T), 0)
        np.minimum(distances, closest, out=distances)
        best = int(distances.sum(axis=1).argmin())
        seeds[i] = x[candidates[best]]
        closest = distances[best]
    return seeds, float(closest.sum())


def silhouette(similarity: np.ndarray, labels: np.ndarray) -> float:
    """Return the mean silhouette of points with cosine `similarity` matrix and `labels`.

    A point's silhouette is (b - a) / max(a, b), with a its mean cosine distance to the
    rest of its cluster and b the least mean distance to another cluster: near 1 when
    clusters are tight and apart, near 0 when they touch. Points alone in their cluster
    count 0; with fewer than two clusters the mean is -1 (no structure found).
    """
    labels = np.unique(labels, return_inverse=True)[1].ravel()
    m, k = len(labels), int(labels.max()) + 1 if len(labels) else 0
    if k < 2:
        return -1.0
    onehot = np.zeros((m, k), np.float32)
    onehot[np.arange(m), labels] = 1
    distance = 1 - similarity
    np.fill_diagonal(distance, 0)
    sums = distance @ onehot
    counts = onehot.sum(axis=0)
    own = counts[labels]
    a = sums[np.arange(m), labels] / np.maximum(own - 1, 1)
    others = sums / counts
    others[np.arange(m), labels] = np.inf
    b = others.min(axis=1)
    top = np.maximum(a, b)
    s = np.where(top > 0, (b - a) / np.where(top > 0, top, 1), 0.0)
    s[own == 1] = 0.0
    return float(s.mean())


def choose_k(
    x: np.ndarray, probe: np.ndarray, similarity: np.ndarray, rng: np.random.Generator
) -> tuple[int, tuple[tuple[int, float], ...]]:
    """Return the K with the best mean silhouette of `probe` when `x` is clustered into K,
    and the (K, silhouette) of every K tried: a grid 2, 3, 4, 6, 8, 11, 16, ... (x sqrt 2)
    up to CLUSTER_AUTO_MAX_K, then every K between the best grid point's neighbours. Ties
    go to the smaller K."""
    top = max(2, min(CLUSTER_AUTO_MAX_K, len(x) - 1, len(probe) - 1))
    grid, k = [], 2
    while k <= top:
        grid.append(k)
        k = max(k + 1, round(k * math.sqrt(2)))
    scores: dict[int, float] = {}

    def score(k: int) -> None:
        centroids = train(x, k, rng)
        scores[k] = round(silhouette(similarity, np.argmax(probe @ centroids.T, axis=1)), 6)
        log.info("k=%d: silhouette %.3f", k, scores[k])

    for k in grid:
        score(k)
    best = max(grid, key=lambda k: (scores[k], -k))
    at = grid.index(best)
    low = grid[at - 1] if at > 0 else 2
    high = grid[at + 1] if at + 1 < len(grid) else top
    for k in range(low + 1, high):
        if k not in scores:
            score(k)
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, tuple(sorted(scores.items()))


def assign(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    centroids: np.ndarray,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (ids, nearest centroid, cosine to it) for every vector in `chunks`."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    all_ids, all_labels, all_scores = [], [], []
    for ids, vecs in chunks:
        scores, labels = index.search(np.ascontiguousarray(vecs, dtype=np.float32), 1)
        all_ids.append(np.asarray(ids, dtype=np.int64))
        all_labels.append(labels[:, 0].astype(np.int32))
        all_scores.append(np.clip(scores[:, 0], -1.0, 1.0).astype(np.float32))
        advance(progress, len(ids))
    if not all_ids:
        return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32)
    return np.concatenate(all_ids), np.concatenate(all_labels), np.concatenate(all_scores)


def number_by_size(labels: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Renumber centroid labels 1..c by cluster size, largest first (ties: by centroid);
    return them and c, the number of clusters that got images."""
    counts = np.bincount(labels, minlength=k)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(k, np.int32)
    rank[order] = np.arange(1, k + 1, dtype=np.int32)
    return rank[labels], int((counts > 0).sum())


def _describe(progress, text: str) -> None:
    """Name the stage on a tqdm bar (other progress objects may not have descriptions)."""
    describe(progress, text)
