"""Acting on duplicates: moving them aside (reversibly) or deleting them, and the index with
them.

A move is logged before it is made: each line of the manifest (JSON lines in the target
folder) records where a file came from and went, with what the index knew of it (its
vector included), and is on disk before the file moves. So after a crash at any point,
`undo` can put every file back and return it to the index without the model. Files are
checked against the index before anything happens to them: a file changed since it was
indexed, or whose kept copy is gone, is left alone and reported.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simsearch.errors import QueryError
from simsearch.files import fsync_dir
from simsearch.records import DuplicateGroup, MoveReport
from simsearch.store import GoodImage

log = logging.getLogger(__name__)

MANIFEST_KIND = "simsearch-dedup-moves"
MANIFEST_VERSION = 1

# Files moved (or deleted) between two index updates: a crash loses at most this many
# index changes, which the next `simsearch index` (or `--undo`) makes good anyway.
INDEX_UPDATE_EVERY = 200


def move(index, groups: Sequence[DuplicateGroup], target: Path) -> MoveReport:
    """Move every group's duplicates under `target`, keeping their paths relative to the
    folder that holds all the groups' files; log each move in a manifest there first."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise QueryError(f"--move-to {target} is a file, not a folder")
    everything = [p for g in groups for p in (g.keep_path, *(d.path for d in g.duplicates))]
    if not everything:
        return MoveReport("move", 0, 0, [], None)
    root = Path(os.path.commonpath([os.path.dirname(p) for p in everything]))
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with _updating(index), open(manifest, "x", encoding="utf-8") as log_file:
        _append(log_file, header)

        def move_one(group, dup, facts) -> str | None:
            dest = target / Path(dup.path).relative_to(root)
            if dest.exists():
                return f"{dest} already exists"
            _append(log_file, _entry(index, dup, dest, group, facts))
            try:
                _move_file(Path(dup.path), dest)
            except OSError as exc:
                return f"cannot move it: {exc.strerror or exc}"
            return None

        done, size, skipped = _act(index, groups, move_one)
    return MoveReport("move", done, size, skipped, str(manifest))


def delete(index, groups: Sequence[DuplicateGroup]) -> MoveReport:
    """Delete every group's duplicates, for good, and remove them from the index."""

    def delete_one(_group, dup, _facts) -> str | None:
        try:
            os.unlink(dup.path)
        except OSError as exc:
            return f"cannot delete it: {exc.strerror or exc}"
        return None

    with _updating(index):
        done, size, skipped = _act(index, groups, delete_one)
    return MoveReport("delete", done, size, skipped, None)


def _act(index, groups, act) -> tuple[int, int, list[tuple[str, str]]]:
    """Apply `act(group, duplicate, facts)` (None when done, else why not) to every
    duplicate safe to act on, and remove the ones done from the index as it goes; return
    (files done, their bytes, [(path, why left alone)])."""
    done, size, skipped, pending = 0, 0, [], []
    for group, dup, facts, reason in _checked(index, groups):
        if reason is None:
            reason = act(group, dup, facts)
        if reason is not None:
            skipped.append((dup.path, reason))
            continue
        done, size = done + 1, size + facts["size"]
        pending.append(dup.id)
        if len(pending) >= INDEX_UPDATE_EVERY:
            _forget(index, pending)
    _forget(index, pending)
    return done, size, skipped


def undo(index, manifest: Path) -> MoveReport:
    """Put back every file a manifest moved, and return them to the index."""
    header, entries = read_manifest(manifest)
    if Path(header["index"]) != index.path.resolve():
        raise QueryError(
            f"{manifest} records moves from the index {header['index']}, not {index.path}; "
            f"give --index {header['index']}"
        )
    done, size, skipped, restored = 0, 0, [], []
    with _updating(index):
        for entry in entries:
            source, dest = Path(entry["from"]), Path(entry["to"])
            if source.exists() and not dest.exists():
                continue  # put back already, or never moved (a crash between log and move)
            if source.exists():
                skipped.append((str(source), f"a file is there again; {dest} was left there"))
                continue
            if not dest.exists():
                skipped.append((str(source), f"{dest} is gone"))
                continue
            try:
                _move_file(dest, source)
            except OSError as exc:
                skipped.append((str(source), f"cannot move it back: {exc.strerror or exc}"))
                continue
            done, size = done + 1, size + entry["size"]
            restored.append(entry)
            if len(restored) >= INDEX_UPDATE_EVERY:
                _restore(index, restored)
        _restore(index, restored)
    with open(manifest, "a", encoding="utf-8") as log_file:
        _append(log_file, {"undone": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return MoveReport("undo", done, size, skipped, str(manifest))


def read_manifest(path: Path) -> tuple[dict, list[dict]]:
    """Return (header, move entries) of a manifest written by `move`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        raise QueryError(f"no such manifest: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QueryError(f"{path} is not a manifest of moved duplicates: {exc}") from None
    if not records or records[0].get("kind") != MANIFEST_KIND:
        raise QueryError(f"{path} is not a manifest of moved duplicates")
    if records[0].get("version", 0) > MANIFEST_VERSION:
        raise QueryError(f"{path} was written by a newer simsearch; upgrade to undo it")
    return records[0], [r for r in records[1:] if "from" in r]


def _checked(index, groups: Sequence[DuplicateGroup]):
    """Yield (group, duplicate, facts, None) for each duplicate safe to act on, or
    (group, duplicate, facts, reason) when it must be left alone."""
    for group in groups:
        ids = [group.keep_id, *(d.id for d in group.duplicates)]
        rows = index.store.file_records(ids)
        kept = rows.get(group.keep_id)
        kept_reason = None if kept and _unchanged(kept) else "the file to keep is gone or changed"
        for dup in group.duplicates:
            facts = rows.get(dup.id)
            if facts is None:
                reason = "no longer in the index"
            elif not _unchanged(facts):
                reason = "changed or gone since it was indexed; run `simsearch index` first"
            else:
                reason = kept_reason
            yield group, dup, facts, reason


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


def _append(log_file, record: dict) -> None:
    """Write one manifest line and make it durable before anything it describes happens."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    os.fsync(log_file.fileno())


def _move_file(source: Path, dest: Path) -> None:
    """Move a file, keeping its modification time; across file systems: copy, fsync,
    rename into place, then delete the source, so no moment has neither copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another file system
            raise
        partial = dest.with_name(dest.name + ".simsearch-partial")
        shutil.copy2(source, partial)
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(partial, dest)
        fsync_dir(dest.parent)
        os.unlink(source)
    fsync_dir(dest.parent)
    fsync_dir(source.parent)


@contextlib.contextmanager
def _updating(index):
    """Hold the index's write lock; save the FAISS file at the end, or drop it from memory
    on an error (the database is the truth: the next open rebuilds from it)."""
    with index._writing():
        index._cache.writable()
        try:
            yield
        except BaseException:
            index._cache.drop()
            raise
        index._cache.checkpoint()


def _forget(index, ids: list[int]) -> None:
    """Remove moved or deleted files from the index (database, then FAISS)."""
    if ids:
        index.store.remove_images(ids)
        index._cache.remove(np.asarray(ids, dtype=np.int64))
    ids.clear()


def _restore(index, entries: list[dict]) -> None:
    """Return put-back files to the index with the vectors the manifest kept for them."""
    usable = [e for e in entries if "vector" in e]
    if usable:
        dim = index.manifest.dim
        vectors = np.stack(
            [np.frombuffer(base64.b64decode(e["vector"]), dtype="<f4") for e in usable]
        )
        if vectors.shape[1] != dim:
            raise QueryError(f"the manifest's vectors are not {dim}-dim: another index's?")
        good = []
        for e in usable:
            st = os.stat(e["from"])
            good.append(
                GoodImage(
                    e["from"], st.st_size, st.st_mtime_ns, e["sha256"], e["width"], e["height"]
                )
            )
        ids, _ = index.store.write_batch(good, vectors)
        index._cache.add(np.asarray(ids, dtype=np.int64), vectors)
        _restore_labels_and_clusters(index.store, dict(zip(ids, usable, strict=True)))
    entries.clear()


def _restore_labels_and_clusters(store, restored: dict[int, dict]) -> None:
    """Give put-back images the labels and cluster they had, where the labels still come
    from the same model and the clustering is still the same run (else the next labelling
    pass or `cluster` run deals with them, as with any new image)."""
    from simsearch.records import Label

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
