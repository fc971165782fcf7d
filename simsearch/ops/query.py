"""Searching an index: queries to vectors (stored ones need no model), filters, hits."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from simsearch.config import DEFAULT_K
from simsearch.errors import InputPathError, QueryError
from simsearch.media.objects import is_url, list_objects
from simsearch.ops.clustering import check_cluster
from simsearch.ops.label import matching_labels, no_match_error
from simsearch.ops.parts import IndexParts
from simsearch.records import Hit, Label, hit_score

Query = str | os.PathLike | int | np.ndarray


def search_many(
    parts: IndexParts,
    queries: Sequence[Query],
    k: int = DEFAULT_K,
    *,
    nprobe: int | None = None,
    ef: int | None = None,
    rerank: int | None = None,
    within: Iterable[int] | None = None,
    label: str | None = None,
    cluster: int | None = None,
) -> list[list[Hit]]:
    """The hits for each query, all answered in one FAISS call (see `Index.search_many`)."""
    store = parts.store
    # Checked first: a bad cluster is a QueryError before any model is loaded.
    members = None if cluster is None else store.cluster_members(check_cluster(parts, cluster))
    for name, value in (("nprobe", nprobe), ("ef", ef), ("rerank", rerank)):
        if value is not None and value < (0 if name == "rerank" else 1):
            raise QueryError(f"{name} must be at least {0 if name == 'rerank' else 1}")
    if k < 1:
        raise QueryError("k must be at least 1")
    if not queries:
        return []
    vectors = [stored_query_vector(parts, q) for q in queries]
    # Queries with no stored vector go through the model together, in batches.
    fresh = [q for q, v in zip(queries, vectors, strict=True) if v is None]
    embedded = iter(parts.models.embed(fresh) if fresh else [])
    matrix = np.stack([next(embedded) if v is None else v for v in vectors])
    allowed = None if within is None else np.unique(np.fromiter(within, dtype=np.int64))
    if label is not None:
        labelled = label_ids(parts, label)
        allowed = labelled if allowed is None else np.intersect1d(allowed, labelled)
    if members is not None:
        allowed = members if allowed is None else np.intersect1d(allowed, members)
    scores, ids = parts.cache.search(matrix, k, nprobe=nprobe, ef=ef, rerank=rerank, within=allowed)
    paths = store.paths(np.unique(ids[ids >= 0]))
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        pairs = zip(row_scores, row_ids.tolist(), strict=True)
        results.append([Hit(i, paths[i], hit_score(s)) for s, i in pairs if i in paths])
    return results


def labels(parts: IndexParts, image: str | os.PathLike | int) -> list[Label]:
    """The stored labels of an indexed image (path, id or "id:N"), best first."""
    image_id = parse_id(image)
    if image_id is None:
        assert not isinstance(image, int)  # parse_id took every int
        known = parts.store.lookup(os.path.abspath(image))
        if known is None:
            raise QueryError(f"not an indexed image: {image}")
        image_id = known.id
    return parts.store.labels_of([image_id]).get(image_id, [])


def label_ids(parts: IndexParts, label: str) -> np.ndarray:
    """Return the ids of images having `label` among their stored labels (any synonym)."""
    store = parts.store
    source = store.label_source()
    if source is None:
        raise QueryError("this index has no labels", fix="add-labels")
    names = store.label_names()
    matched = matching_labels(label, names)
    ids = store.ids_with_labels(matched) if matched else np.empty(0, np.int64)
    if not len(ids):
        raise no_match_error(label, names, source)
    return ids


def stored_query_vector(parts: IndexParts, query: Query) -> np.ndarray | None:
    """Return the query's vector when no model is needed for it, else None."""
    dim = parts.manifest.dim
    if isinstance(query, np.ndarray):
        if query.shape != (dim,):
            raise QueryError(f"a query vector must have shape ({dim},)")
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm) or norm == 0:
            raise QueryError("a query vector must be finite and non-zero")
        return (query / norm).astype(np.float32)
    image_id = parse_id(query)
    if image_id is not None:
        vector = parts.store.vector(image_id)
        if vector is None:
            raise QueryError(f"no indexed image has id {image_id}")
        return vector
    if is_url(query):
        return _stored_vector_for_object(parts, query)
    if isinstance(query, (str, os.PathLike)):
        return stored_vector_for(parts, Path(query))
    return None


def _stored_vector_for_object(parts: IndexParts, url: str) -> np.ndarray | None:
    """The stored vector of an indexed object whose size and LastModified are unchanged."""
    known = parts.store.lookup(url)
    if known is None:
        return None
    try:
        now = next(list_objects(url), None)
    except InputPathError:
        return None
    if now is None or now[0] != url or not known.same(*now[1:]):
        return None
    return parts.store.vector(known.id)


def stored_vector_for(parts: IndexParts, path: Path) -> np.ndarray | None:
    """Return the stored vector of an indexed file that has not changed since, else None."""
    key = os.path.abspath(path)
    known = parts.store.lookup(key)
    try:
        if known is None or not known.unchanged(os.stat(key)):
            return None
    except OSError:
        return None
    return parts.store.vector(known.id)


def parse_id(query) -> int | None:
    """The image id a query names (an int, or "id:N"), or None when it names none."""
    if isinstance(query, (bool, np.bool_)):
        raise QueryError(f"not a query: {query!r}")
    if isinstance(query, (int, np.integer)):
        return image_id(int(query))
    if isinstance(query, str) and query.startswith("id:"):
        try:
            return image_id(int(query[3:]))
        except ValueError:
            raise QueryError(f"bad id query {query!r}: expected id:N with N an integer") from None
    return None


def image_id(n: int) -> int:
    """`n` if it can be an image id (SQLite's 64-bit row ids), else a QueryError."""
    if not 0 <= n < 2**63:
        raise QueryError(f"no indexed image has id {n}: ids are 1 to {2**63 - 1}")
    return n
