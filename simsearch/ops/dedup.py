"""Near-duplicate groups: a kNN graph from batched searches, edges above a cosine threshold,
groups by union-find, and one image to keep per group.

Never an all-pairs matrix: each stored vector asks the index for its `neighbours` nearest,
a chunk at a time, so memory is the index plus one chunk plus the edges found. Byte-
identical files (same SHA-256) are always one group, whatever their vectors. Connected sets
are then split so that every duplicate is within the threshold of the image kept: a chain
of pairs each above it (a ~ b ~ c) does not make c a duplicate of a.

One file is one file: indexed paths that name the same file (a symlink, a hard link, a
folder indexed under two names) are one member of a group, never each other's duplicates;
the other paths are listed as the group's aliases and nothing acts on them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from simsearch.errors import ImageError
from simsearch.media.header import header_facts
from simsearch.progress import Progress, advance
from simsearch.records import Duplicate, DuplicateGroup, FileFacts


@dataclass(frozen=True)
class Member:
    """An indexed path as the keep rule sees it."""

    path: str
    facts: FileFacts
    file: tuple[int, int] | None  # (st_dev, st_ino) of the file it names; None if unreadable
    direct: bool = True  # no symbolic link on the way to it


def describe(path: str, facts: FileFacts) -> Member:
    """Return the indexed file at `path` as the keep rule sees it: which file it is, and its
    stored facts, with the true pixel size and format read from the header where the row
    predates them (indexes made before they were kept stored the draft decode's size) and
    the file is unchanged since indexed."""
    try:
        st = os.stat(path)
    except OSError:
        return Member(path, facts, None)
    direct = os.path.realpath(path) == os.path.abspath(path)
    if facts.format is None and (st.st_size, st.st_mtime_ns) == (facts.size, facts.mtime_ns):
        try:
            found = header_facts(path)
        except ImageError:
            pass
        else:
            facts = dataclasses.replace(
                facts,
                width=found.width,
                height=found.height,
                format=found.format,
                lossless=found.lossless,
            )
    return Member(path, facts, (st.st_dev, st.st_ino), direct)


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


# The keep rule, in order, as (what wins, the sort key's part): the best image is kept.
KEEP_RULE = (
    # A real file over a symbolic link: keeping a link and removing the real file would
    # leave the folder holding only a pointer to a file elsewhere, which may go too.
    ("a file, not a link", lambda m: not m.direct),
    ("higher resolution", lambda m: -m.facts.width * m.facts.height),
    ("lossless", lambda m: not m.facts.lossless),
    ("larger file", lambda m: -m.facts.size),
    ("older", lambda m: m.facts.mtime_ns),
    ("shorter path", lambda m: len(m.path)),
    ("first by path", lambda m: m.path),
)


def keep_order(member: Member) -> tuple:
    """The keep rule as a sort key, best first: a path with no symbolic link on the way
    over one through a link, then highest true resolution, then lossless over
    lossy, then largest file, then oldest (modification time), then shortest path (then the
    path, for a total order)."""
    return tuple(part(member) for _, part in KEEP_RULE)


def why_kept(kept: Member, other: Member) -> str:
    """Return the first rule by which `kept` comes before `other` ("a file, not a link",
    "higher resolution", "lossless", ...)."""
    for reason, part in KEEP_RULE:
        if part(kept) != part(other):
            return reason
    return "first by path"


def find_groups(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    same_content: Sequence[list[int]],
    facts: Callable[[list[int]], dict[int, Member]],
    vectors: Callable[[list[int]], dict[int, np.ndarray]],
    threshold: float,
    neighbours: int,
    margin: float = 0.0,
    key: Callable[[Member], tuple] = keep_order,
    progress: Progress | None = None,
) -> list[DuplicateGroup]:
    """Group the stored vectors (`chunks` of (ids, vectors)) whose cosine reaches
    `threshold`, plus the ids in each `same_content` list; name the one to keep by `key`.
    `facts(ids)` describes the members (see `describe`); paths naming one file are one.

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
        advance(progress, len(ids))
    for same in same_content:
        for other in same[1:]:
            sets.union(same[0], other)
    identical = {}
    for same in same_content:
        for member in same:
            identical[member] = same[0]
    result = []
    for members in sets.groups():
        info = facts(members)
        members = [m for m in members if m in info]  # removed since the search
        members, aliases = _one_path_per_file(members, info, key)
        stored = vectors(members)
        for group in _split(members, info, stored, identical, threshold, key):
            in_group = [group.keep_id, *(d.id for d in group.duplicates)]
            named = tuple(sorted(p for i in in_group for p in aliases.get(i, ())))
            result.append(dataclasses.replace(group, aliases=named) if named else group)
    result.sort(key=lambda g: g.keep_path)
    return result


def _one_path_per_file(
    members: list[int], info: dict[int, Member], key
) -> tuple[list[int], dict[int, list[str]]]:
    """Return (one id per file among `members`, id -> the other paths naming its file). The
    path kept for a file is one with no symbolic link on the way, then the best by `key`."""
    by_file: dict[tuple, list[int]] = {}
    for m in members:
        by_file.setdefault(info[m].file or ("id", m), []).append(m)
    chosen, aliases = [], {}
    for same in by_file.values():
        same.sort(key=lambda m: (not info[m].direct, key(info[m])))
        chosen.append(same[0])
        if len(same) > 1:
            aliases[same[0]] = [info[m].path for m in same[1:]]
    return sorted(chosen), aliases


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
                why = why_kept(info[keep], info[m])
                dups.append(Duplicate(m, info[m].path, score, info[m].facts, why))
            else:
                far.append(m)
        if dups:
            dups.sort(key=lambda d: (-d.score, d.path))
            kept = info[keep]
            groups.append(DuplicateGroup(keep, kept.path, tuple(dups), kept.facts))
        rest = far
    return groups


def _score(stored: dict[int, np.ndarray], a: int, b: int) -> float:
    if a in stored and b in stored:
        return round(float(np.clip(stored[a] @ stored[b], -1.0, 1.0)), 6)
    return -1.0  # no vector (removed since the search): never a duplicate by similarity
