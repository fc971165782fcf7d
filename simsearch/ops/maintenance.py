"""Looking after an index: its type, its checks (`verify`), its repair, its summary (`info`)."""

from __future__ import annotations

import dataclasses

from simsearch.errors import DatabaseError, IndexFormatError
from simsearch.ops.clustering import clustering
from simsearch.ops.parts import IndexParts
from simsearch.records import IndexInfo
from simsearch.search.plan import plan_index, try_index_type
from simsearch.storage.folder import write_atomic
from simsearch.storage.manifest import DATABASE_FILE, MANIFEST_FILE, VECTORS_FILE, Manifest


def set_index_type(parts: IndexParts, index_type: str) -> str | None:
    """Make the index use `index_type`, rebuilding it if that changes it; return why it
    rebuilt, or None (see `Index.set_index_type`)."""
    index_type = index_type.strip()
    try_index_type(index_type, parts.manifest.dim)  # IndexTypeError if it is unusable
    plan_index(index_type, parts.store.counts()[0], parts.manifest.dim)
    with parts.writing():
        parts.set_manifest(dataclasses.replace(parts.manifest, index_type=index_type))
        reason = parts.cache.maintain()
        if reason is not None:
            parts.cache.save()
    return reason


def verify(parts: IndexParts) -> list[str]:
    """Return a description of every broken invariant (see `Index.verify`)."""
    path, store, manifest = parts.path, parts.store, parts.manifest
    problems = []
    try:
        on_disk = Manifest.from_json((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{MANIFEST_FILE} is missing")
    except Exception as exc:
        problems.append(f"{MANIFEST_FILE} is unreadable: {exc}")
    else:
        if on_disk != manifest:
            problems.append(f"{MANIFEST_FILE} differs from the manifest in {DATABASE_FILE}")
    try:
        report = store.check(manifest.dim)
    except DatabaseError as exc:
        return [*problems, parts.folder.damaged(exc)]
    problems += report.problems
    if parts.folder.manifest_from_file:
        problems.append(f"the manifest in {DATABASE_FILE} is damaged ({MANIFEST_FILE} stands in)")
    try:
        generation_ok = store.generation() >= 0
    except IndexFormatError as exc:
        problems.append(str(exc))
        generation_ok = False
    if not report.corrupt and not report.damaged and generation_ok:
        problems += parts.cache.problems()
    return problems


def repair(parts: IndexParts) -> list[str]:
    """Rebuild what can be rebuilt from the database; return what was done."""
    folder = parts.folder
    actions = []
    folder.repairing = True
    try:
        with parts.writing():
            if parts.store.repair_meta(parts.manifest if folder.manifest_from_file else None):
                actions.append(f"renewed the generation numbers in {DATABASE_FILE}")
            if folder.manifest_from_file:
                folder.manifest_from_file = False
                actions.append(f"restored the manifest in {DATABASE_FILE} from {MANIFEST_FILE}")
            actions += _repair_files(parts)
    finally:
        folder.repairing = False
    return actions


def _repair_files(parts: IndexParts) -> list[str]:
    store, cache = parts.store, parts.cache
    actions = []
    try:
        report = store.check(parts.manifest.dim)
    except DatabaseError as exc:
        raise IndexFormatError(parts.folder.damaged(exc)) from None
    if report.corrupt:
        raise IndexFormatError(parts.folder.damaged(report.problems[0]))
    redo = sorted(set(report.damaged) | set(report.unvectored))
    if redo:
        store.reset_vectors(
            redo, "its stored vector was damaged; the next `simsearch index` embeds it"
        )
        actions.append(
            f"marked {len(redo)} images with damaged or missing vectors to be "
            "embedded again by the next `simsearch index`"
        )
    if report.stray:
        store.delete_vectors(report.stray)
        actions.append(f"deleted {len(report.stray)} stray vectors")
    manifest_file = parts.path / MANIFEST_FILE
    wanted = parts.manifest.to_json() + "\n"
    try:
        current = manifest_file.read_text(encoding="utf-8")
    except (OSError, ValueError):  # missing, unreadable, not UTF-8
        current = None
    if current != wanted:
        write_atomic(manifest_file, wanted)
        actions.append(f"rewrote {MANIFEST_FILE} from the database")
    if cache.problems():
        vectors = cache.rebuild()
        cache.save()
        actions.append(f"rebuilt {VECTORS_FILE} from the database ({len(vectors)} vectors)")
    return actions


def info(parts: IndexParts) -> IndexInfo:
    """Return counts, settings and size on disk."""
    store = parts.store
    indexed, failed = store.counts()
    m = parts.manifest
    built, vectors = parts.cache.built, parts.cache.vectors
    size = sum(f.stat().st_size for f in parts.path.iterdir() if f.is_file())
    labels = store.label_source()
    run = clustering(parts)
    return IndexInfo(
        path=str(parts.path),
        indexed=indexed,
        failed=failed,
        model=m.model,
        weights_sha256=m.weights_sha256,
        revision=m.revision,
        architecture=m.architecture,
        dim=m.dim,
        layer=m.layer,
        num_layers=m.num_layers,
        pool=m.pool,
        precision=m.precision,
        preprocessing=m.preprocessing,
        size_bytes=size,
        format_version=m.format_version,
        index_type=m.index_type,
        index_built=built.get("kind", "flat"),
        index_factory=built.get("factory", "Flat"),
        index_reason=built.get("reason", ""),
        tombstones=vectors.tombstones,
        dedup_calibration=m.dedup_calibration,
        label_model=(labels or {}).get("model"),
        label_top=int((labels or {}).get("top", 0)),
        labelled=store.labelled_count(),
        clustering=run,
        clustered=0 if run is None else store.clustered_count(),
    )
