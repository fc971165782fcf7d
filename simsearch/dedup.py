"""Near-duplicate groups: a kNN graph from batched searches, edges above a cosine threshold,
groups by union-find, and one image to keep per group.

Never an all-pairs matrix: each stored vector asks the index for its `neighbours` nearest,
a chunk at a time, so memory is the index plus one chunk plus the edges found. Byte-
identical files (same SHA-256) are always one group, whatever their vectors. Connected sets
are then split so that every duplicate is within the threshold of the image kept: a chain
of pairs each above it (a ~ b ~ c) does not make c a duplicate of a.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from simsearch.records import Duplicate, DuplicateGroup


class UnionFind:
    """Disjoint sets over integer ids, created on first mention."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = parent.setdefault(x, x)
        while root != parent[root]:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        """Every set of two or more ids, each sorted."""
        members: dict[int, list[int]] = {}
        for x in self.parent:
            members.setdefault(self.find(x), []).append(x)
        return [sorted(m) for m in members.values() if len(m) > 1]


def keep_order(facts: tuple) -> tuple:
    """The keep policy as a sort key, best first: highest resolution, then largest file,
    then oldest (modification time), then shortest path (then the path, for a total order).
    `facts`: (path, width, height, size, mtime_ns)."""
    path, width, height, size, mtime_ns = facts
    return (-(width or 0) * (height or 0), -size, mtime_ns, len(path), path)


def find_groups(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    same_content: Iterable[list[int]],
    facts: Callable[[list[int]], dict[int, tuple]],
    vectors: Callable[[list[int]], dict[int, np.ndarray]],
    threshold: float,
    neighbours: int,
    margin: float = 0.0,
    key: Callable[[tuple], tuple] = keep_order,
    progress=None,
) -> list[DuplicateGroup]:
    """Group the stored vectors (`chunks` of (ids, vectors)) whose cosine reaches
    `threshold`, plus the ids in each `same_content` list; name the one to keep by `key`.

    `search` may return approximate scores: candidates within `margin` below the threshold
    (2: all of them) are checked against the stored vectors, and only exact cosines decide
    an edge.
    """
    sets = UnionFind()
    for ids, vecs in chunks:
        scores, found = search(vecs, neighbours + 1)  # + 1: a vector finds itself
        hit = (scores >= threshold - margin) & (found >= 0) & (found != ids[:, None])
        rows, cols = np.nonzero(hit)
        others = found[rows, cols]
        if margin > 0 and len(rows):
            stored = vectors(np.unique(others).tolist())
            known = np.array([o in stored for o in others.tolist()], dtype=bool)
            rows, others = rows[known], others[known]
            if len(rows):
                exact = np.einsum(
                    "nd,nd->n", vecs[rows], np.stack([stored[o] for o in others.tolist()])
                )
                rows, others = rows[exact >= threshold], others[exact >= threshold]
        for a, b in zip(ids[rows].tolist(), others.tolist(), strict=True):
            sets.union(a, b)
        if progress is not None:
            progress.update(len(ids))
    for ids in same_content:
        for other in ids[1:]:
            sets.union(ids[0], other)
    identical = {}
    for ids in same_content:
        for member in ids:
            identical[member] = ids[0]
    result = []
    for members in sets.groups():
        info = facts(members)
        members = [m for m in members if m in info]  # removed since the search
        stored = vectors(members)
        result += _split(members, info, stored, identical, threshold, key)
    result.sort(key=lambda g: g.keep_path)
    return result


def _split(members, info, stored, identical, threshold, key) -> list[DuplicateGroup]:
    """Turn a connected set into groups in which every duplicate is at least `threshold`
    similar to the image kept (or has its bytes): a chain a ~ b ~ c does not make c a
    duplicate of a. The best image by `key` is kept; the members too far from it are
    grouped again among themselves."""
    groups = []
    rest = sorted(members, key=lambda m: key(info[m]))
    while len(rest) > 1:
        keep, far = rest[0], []
        dups = []
        for m in rest[1:]:
            same = m in identical and identical.get(keep) == identical[m]
            score = 1.0 if same else _score(stored, keep, m)
            if same or score >= threshold:
                dups.append(Duplicate(m, info[m][0], score))
            else:
                far.append(m)
        if dups:
            dups.sort(key=lambda d: (-d.score, d.path))
            groups.append(DuplicateGroup(keep, info[keep][0], tuple(dups)))
        rest = far
    return groups


def _score(stored: dict[int, np.ndarray], a: int, b: int) -> float:
    if a in stored and b in stored:
        return round(float(np.clip(stored[a] @ stored[b], -1.0, 1.0)), 6)
    return -1.0  # no vector (removed since the search): never a duplicate by similarity
