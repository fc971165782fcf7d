"""Undoing a move of duplicates (ops.moves): every file a manifest logged is put back and
returned to the index with what the index knew of it, without the model.

The manifest is read as data to check, never as orders (see `movelog`): its root must be
where the index's files are, nothing is done through a symbolic link, and a file is moved
back only when it is still the file that was moved there and its old path is free. An undo
is safe to run again, and after a crash at any point: files already back are passed over
(and indexed, when a crash came between the move and the index update).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import numpy as np

from simsearch.errors import QueryError
from simsearch.fs.faults import crash_point
from simsearch.fs.files import link_below, move_entry
from simsearch.ops.movelog import Manifest, append_undone, check, entries
from simsearch.ops.moves import INDEX_UPDATE_EVERY, forget, updating, why
from simsearch.ops.parts import IndexParts
from simsearch.records import Label, MoveReport
from simsearch.storage.store import GoodImage

log = logging.getLogger(__name__)


def undo(index: IndexParts, manifest_path: Path) -> MoveReport:
    """Put back every file a manifest moved, and return them to the index."""
    dim = index.manifest.dim
    manifest = check(manifest_path, dim)
    if Path(manifest.header["index"]) != index.path.resolve():
        raise QueryError(
            f"{manifest.path} records moves from the index {manifest.header['index']}, not "
            f"{index.path}; undo it from that index",
            param="index",
            path=manifest.header["index"],
        )
    _check_root(index, manifest)
    done, size, skipped = 0, 0, []
    restored: list[dict] = []
    with updating(index):
        try:
            for entry in entries(manifest, dim):
                reason = _put_back(index, manifest, entry, restored)
                if reason == "":
                    continue
                if reason is not None:
                    skipped.append((entry["from"], reason))
                    continue
                done, size = done + 1, size + entry["size"]
                crash_point("undo-moved")
                if len(restored) >= INDEX_UPDATE_EVERY:
                    _restore(index, restored)
        finally:
            _restore(index, restored)  # what is back is indexed, even on the way out
    try:
        append_undone(manifest, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except OSError as exc:  # only a note: every file is back and indexed already
        log.warning("cannot note in %s that it was undone: %s", manifest.path, exc)
    return MoveReport("undo", done, size, skipped, str(manifest.path))


def _check_root(index, manifest: Manifest) -> None:
    """The root the manifest names must be where this index's files are: no higher than
    the folder that holds every indexed file and every file the manifest names (an edited
    root of `/` would let it put files anywhere)."""
    if manifest.span is None:
        return
    folders = [str(manifest.span)]
    folders += [os.path.dirname(p) for p in index.store.path_bounds()]
    span = Path(os.path.commonpath(folders))
    if manifest.root != span and span not in manifest.root.parents:
        raise QueryError(
            f"{manifest.path} is not a manifest of moved duplicates as simsearch writes them "
            f"(line 1: its root {manifest.root} is above {span}, which holds every indexed "
            "file); nothing was moved"
        )


def _put_back(index, manifest: Manifest, entry: dict, restored: list) -> str | None:
    """Move one file back; None when done (and queued in `restored`), "" when there is
    nothing to do, else why it was left alone."""
    rel = Path(entry["from"]).relative_to(manifest.root)
    dest = manifest.target / rel
    link = link_below(manifest.root, Path(entry["from"]))
    if link is not None:
        return f"the symbolic link {link} is in the way; {dest} was left there"
    here = os.path.lexists(entry["from"])
    link = link_below(manifest.folder, manifest.folder / rel)
    there = link is None and os.path.lexists(manifest.folder / rel)
    if here and not there:  # put back already (or never moved: a crash between log and move)
        if index.store.lookup(entry["from"]) is None and _is_moved_file(entry["from"], entry):
            restored.append(entry)  # an undo killed after the move, before the index update
        return ""
    if link is not None:
        return f"the symbolic link {link} is in the way; {dest} was left there"
    if here:
        return f"a file is there again; {dest} was left there"
    if not there:
        return f"{dest} is gone"
    if not _is_moved_file(manifest.folder / rel, entry):
        return f"{dest} is not the file moved there (changed or replaced since); left there"
    try:
        entry_id = os.lstat(manifest.folder / rel)
        move_entry(manifest.folder, rel, manifest.root, rel, (entry_id.st_dev, entry_id.st_ino))
    except OSError as exc:
        return why(exc, "cannot move it back")
    restored.append(entry)
    return None


def _is_moved_file(path, entry: dict) -> bool:
    """Whether `path` (not followed) is what the entry moved: the same link, or a regular
    file of the same size and modification time."""
    try:
        st = os.lstat(path)
        if "link" in entry:
            return stat.S_ISLNK(st.st_mode) and os.readlink(path) == entry["link"]
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (
        entry["size"],
        entry["mtime_ns"],
    )


def _restore(index, entries: list[dict]) -> None:
    """Return put-back files to the index with the vectors the manifest kept for them, and
    forget the paths they had been moved to (indexed there when the target folder lies
    inside an indexed folder and `index` ran before the undo)."""
    away = [known.id for e in entries if (known := index.store.lookup(e["to"])) is not None]
    forget(index, away)
    usable = [e for e in entries if "vector" in e]
    if usable:
        vectors = np.stack([e["vector"] for e in usable])  # checked by movelog
        good = []
        for e in usable:
            st = os.stat(e["from"])
            good.append(
                GoodImage(
                    e["from"], st.st_size, st.st_mtime_ns, e["sha256"], e["width"], e["height"]
                )
            )
        ids, _ = index.store.write_batch(good, vectors)
        index.cache.add(np.asarray(ids, dtype=np.int64), vectors)
        _restore_labels_and_clusters(index.store, dict(zip(ids, usable, strict=True)))
    entries.clear()


def _restore_labels_and_clusters(store, restored: dict[int, dict]) -> None:
    """Give put-back images the labels and cluster they had, where the labels still come
    from the same model and the clustering is still the same run (else the next labelling
    pass or `cluster` run deals with them, as with any new image)."""
    source = store.label_source()
    labels = {
        image_id: [Label(name, float(score)) for name, score in e["labels"]["labels"]]
        for image_id, e in restored.items()
        if "labels" in e and source is not None and e["labels"]["source"] == source
    }
    if labels:
        store.write_labels(labels, source)
    run = (store.clustering() or {}).get("created_at")
    clusters = [
        (image_id, e["cluster"]["cluster"], e["cluster"]["score"])
        for image_id, e in restored.items()
        if "cluster" in e and run is not None and e["cluster"]["run"] == run
    ]
    if clusters:
        store.restore_clusters(clusters)
