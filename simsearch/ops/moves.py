"""Acting on duplicates: moving them aside (reversibly) or deleting them, and the index with
them.

A move is logged before it is made: each line of the manifest (JSON lines in the target
folder, see `movelog`) records where a file came from and went, with what the index knew of
it (its vector included), and is on disk before the file moves. So after a crash at any
point, `undo` (ops.undo) can put every file back and return it to the index without the
model.

The user's files come first. Before anything happens to a duplicate it is checked against
the index (unchanged since indexing) and against the files kept: a duplicate that is the
same file (device and inode) as any kept image of the run, or as a file already moved or
deleted in this run, is left alone, and so is every duplicate of a kept image that is gone
or changed. Nothing is done through a symbolic link: each folder below the root is opened
with O_NOFOLLOW, a path reached through a link is left alone, and a duplicate that is a link
is moved or deleted as the link itself (its target untouched; it is put back as it was).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import QueryError, StorageError
from simsearch.fs.files import LINK_ERRNOS, entry_id, link_below, move_entry, open_folder
from simsearch.media.objects import is_url
from simsearch.ops.movelog import MANIFEST_KIND, MANIFEST_VERSION, ManifestWriter
from simsearch.ops.parts import IndexParts
from simsearch.records import DuplicateGroup, MoveReport

log = logging.getLogger(__name__)

# Files moved (or deleted) between two index updates: a crash loses at most this many
# index changes, which the next `simsearch index` (or `--undo`) makes good anyway.
INDEX_UPDATE_EVERY = 200

# Errors after which every further write to that disk fails too: stop, do not skip.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


class _Stop(Exception):
    """The target disk is full: stop after the last complete move."""

    def __init__(self, exc: OSError):
        self.exc = exc


@dataclass(frozen=True)
class _Found:
    """What a checked duplicate is: the file its data is in, and the entry itself."""

    identity: tuple[int, int]  # (st_dev, st_ino) of the data
    entry: tuple[int, int]  # (st_dev, st_ino) of the directory entry (a link's own)
    link: str | None  # the link's target text, for a symbolic link


def move(index: IndexParts, groups: Sequence[DuplicateGroup], target: Path) -> MoveReport:
    """Move every group's duplicates under `target`, keeping their paths relative to the
    folder that holds all the groups' files; log each move in a manifest there first."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise QueryError(f"{target} is a file, not a folder", param="move_to", path=target)
    root = _root(groups)
    if root is None:
        return MoveReport("move", 0, 0, [], None)
    if target == root or root in target.parents:
        log.warning(
            "%s is inside the indexed folder %s: indexing that folder again will index the "
            "moved files again; a folder outside it is safer",
            target,
            root,
        )
    target.mkdir(parents=True, exist_ok=True)
    manifest = target / time.strftime("simsearch-moves-%Y%m%d-%H%M%S.jsonl")
    while manifest.exists():  # two runs in one second
        manifest = manifest.with_name(manifest.stem + "-1.jsonl")
    header = {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "index": str(index.path.resolve()),
        "root": str(root),
        "target": str(target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        writer = ManifestWriter(manifest)
    except OSError as exc:
        raise StorageError(f"cannot write to {target}: {exc.strerror or exc}") from None
    try:
        with updating(index):
            try:
                writer.append(header)
            except OSError as exc:
                raise StorageError(
                    f"cannot write to {target}: {exc.strerror or exc}; nothing was moved"
                ) from None

            def move_one(group, dup, facts, found: _Found) -> str | None:
                rel = Path(dup.path).relative_to(root)
                dest = target / rel
                if os.path.lexists(dest):
                    return f"{dest} already exists"
                entry = _entry(index, dup, dest, group, facts)
                if found.link is not None:
                    entry["link"] = found.link
                try:
                    writer.append(entry)
                except OSError as exc:
                    raise _Stop(exc) from None
                try:
                    move_entry(root, rel, target, rel, found.entry)
                except OSError as exc:
                    if exc.errno in DISK_FULL:
                        raise _Stop(exc) from None
                    return why(exc, "cannot move it")
                return None

            try:
                done, size, skipped = _act(index, groups, root, move_one, "moved")
            except _Stopped as stopped:
                raise StorageError(
                    f"cannot write to {target}: {stopped.exc.strerror or stopped.exc}; "
                    f"stopped after the last complete move: moved {stopped.done} files "
                    f"({stopped.size / 2**20:.1f} MB), logged in {manifest}",
                    path=manifest,
                    fix="undo",
                ) from None
    finally:
        writer.close()
    return MoveReport("move", done, size, skipped, str(manifest))


def delete(index: IndexParts, groups: Sequence[DuplicateGroup]) -> MoveReport:
    """Delete every group's duplicates, for good, and remove them from the index."""
    root = _root(groups)
    if root is None:
        return MoveReport("delete", 0, 0, [], None)

    def delete_one(_group, dup, _facts, found: _Found) -> str | None:
        rel = Path(dup.path).relative_to(root)
        try:
            folder = open_folder(root, rel.parent.parts)
        except OSError as exc:
            return why(exc, "cannot delete it")
        try:
            if entry_id(rel.name, folder) != found.entry:
                return "replaced since it was checked"
            os.unlink(rel.name, dir_fd=folder)  # the entry itself: a link, not its target
            os.fsync(folder)
        except OSError as exc:
            return why(exc, "cannot delete it")
        finally:
            os.close(folder)
        return None

    with updating(index):
        done, size, skipped = _act(index, groups, root, delete_one, "deleted")
    return MoveReport("delete", done, size, skipped, None)


def _root(groups: Sequence[DuplicateGroup]) -> Path | None:
    """The folder that holds every file of the groups (None for no groups)."""
    everything = [p for g in groups for p in (g.keep_path, *(d.path for d in g.duplicates))]
    if not everything:
        return None
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in everything]))


class _Stopped(Exception):
    def __init__(self, exc: OSError, done: int, size: int):
        self.exc, self.done, self.size = exc, done, size


def _act(
    index: IndexParts, groups, root: Path, act, verb: str
) -> tuple[int, int, list[tuple[str, str]]]:
    """Apply `act(group, duplicate, facts, found)` (None when done, else why not) to every
    duplicate safe to act on, and remove the ones done from the index as it goes; return
    (files done, their bytes, [(path, why left alone)]). A full disk (_Stop) ends it with
    _Stopped, after the index has forgotten every file done."""
    done, size, skipped, pending = 0, 0, [], []
    kept = _kept_files(groups)
    acted: dict[tuple[int, int], str] = {}
    try:
        for group in groups:
            rows = index.store.file_records([group.keep_id, *(d.id for d in group.duplicates)])
            keep_row = rows.get(group.keep_id)
            keep_ok = (
                keep_row is not None
                and keep_row["path"] == group.keep_path
                and _unchanged(keep_row)
            )
            for dup in group.duplicates:
                facts = rows.get(dup.id)
                reason, found = _refusal(dup, facts, keep_ok, root, kept, acted, verb)
                if reason is None:
                    reason = act(group, dup, facts, found)
                if reason is not None:
                    skipped.append((dup.path, reason))
                    continue
                assert found is not None and facts is not None  # a reason, or what it found
                acted[found.identity] = dup.path
                done, size = done + 1, size + facts["size"]
                pending.append(dup.id)
                if len(pending) >= INDEX_UPDATE_EVERY:
                    forget(index, pending)
    except _Stop as stop:
        forget(index, pending)
        raise _Stopped(stop.exc, done, size) from None
    forget(index, pending)
    return done, size, skipped


def _kept_files(groups: Sequence[DuplicateGroup]) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every kept image of the run that is there."""
    kept: dict[tuple[int, int], str] = {}
    for group in groups:
        try:
            st = os.stat(group.keep_path)
        except OSError:
            continue
        kept.setdefault((st.st_dev, st.st_ino), group.keep_path)
    return kept


def _refusal(dup, facts, keep_ok, root, kept, acted, verb) -> tuple[str | None, _Found | None]:
    """(None, what the duplicate is) if it is safe to act on, else (why not, None)."""
    if facts is None:
        return "no longer in the index", None
    if is_url(dup.path):
        return "an object in object storage: simsearch moves and deletes only files", None
    if facts["path"] != dup.path:  # act on what the index knows, never on a caller's string
        return f"the index knows image {dup.id} as {facts['path']}, not as this path", None
    if not _unchanged(facts):
        return "changed or gone since it was indexed; run `simsearch index` first", None
    if not keep_ok:
        return "the file to keep is gone or changed", None
    try:
        st, lst = os.stat(dup.path), os.lstat(dup.path)
    except OSError as exc:
        return why(exc, "cannot look at it"), None
    identity = (st.st_dev, st.st_ino)
    if identity in kept:
        return f"the same file as the kept image {kept[identity]} (a link or alias of it)", None
    if identity in acted:
        return f"the same file as {acted[identity]}, which this run already {verb}", None
    link = link_below(root, Path(dup.path))
    if link is not None:
        return (
            f"reached through the symbolic link {link}; simsearch does not act through links",
            None,
        )
    target = os.readlink(dup.path) if stat.S_ISLNK(lst.st_mode) else None
    return None, _Found(identity, (lst.st_dev, lst.st_ino), target)


def why(exc: OSError, doing: str) -> str:
    """Why a file is left alone when `doing` it failed with `exc` (ops.undo uses it too)."""
    if exc.errno in LINK_ERRNOS:
        return f"a folder on its path is a symbolic link now; {doing} through it"
    return f"{doing}: {exc.strerror or exc}"


def _unchanged(facts: dict) -> bool:
    try:
        st = os.stat(facts["path"])
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (facts["size"], facts["mtime_ns"])


def _entry(index, dup, dest: Path, group, facts: dict) -> dict:
    """The manifest line of a move: enough to put the file back and give the index back
    everything it knew of it (vector, labels, cluster) without the model."""
    store = index.store
    entry = {
        "from": dup.path,
        "to": str(dest),
        "keep": group.keep_path,
        "score": dup.score,
        **{k: facts[k] for k in ("size", "mtime_ns", "sha256", "width", "height")},
    }
    vector = store.vectors_by_id([dup.id]).get(dup.id)
    if vector is not None:
        entry["vector"] = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    labels = store.labels_of([dup.id]).get(dup.id)
    if labels:
        entry["labels"] = {
            "source": store.label_source(),
            "labels": [[x.label, x.score] for x in labels],
        }
    cluster = store.clusters_of([dup.id]).get(dup.id)
    if cluster is not None:
        run = store.clustering() or {}
        entry["cluster"] = {
            "run": run.get("created_at"),
            "cluster": cluster[0],
            "score": cluster[1],
        }
    return entry


@contextlib.contextmanager
def updating(index):
    """Hold the index's write lock; save the FAISS file at the end, or drop it from memory
    on an error (the database is the truth: the next open rebuilds from it)."""
    with index.writing():
        index.cache.writable()
        try:
            yield
        except BaseException:
            index.cache.drop()
            raise
        index.cache.checkpoint()


def forget(index, ids: list[int]) -> None:
    """Remove moved or deleted files from the index (database, then FAISS)."""
    if ids:
        index.store.remove_images(ids)
        index.cache.remove(np.asarray(ids, dtype=np.int64))
    ids.clear()
