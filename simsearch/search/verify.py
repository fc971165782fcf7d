"""Comparing an index's FAISS file with its database: whether it is the very file the index
saved (checked on every load, search.cache), and everything `verify` reports about it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simsearch.search.vectors import VectorIndex
from simsearch.storage.manifest import VECTORS_FILE
from simsearch.storage.store import Store


def check_same_file(file: Path, built: dict) -> None:
    """Raise ValueError unless `file` has the size and modification time recorded when it
    was saved (files saved before simsearch recorded them pass)."""
    recorded = built.get("file")
    if not recorded:
        return
    st = file.stat()
    if [st.st_size, st.st_mtime_ns] != list(recorded):
        raise ValueError(
            "it is not the file this index saved: its size or modification time changed "
            "(replaced, copied in or edited since)"
        )


def file_problems(file: Path, store: Store, dim: int) -> list[str]:
    """Return how the FAISS file disagrees with the database (empty: it is current)."""
    generation, saved = store.generations()
    if not file.is_file():
        return [f"{VECTORS_FILE} is missing"] if generation > 0 else []
    problems = []
    if saved != generation:
        problems.append(
            f"{VECTORS_FILE} is stale: built at generation {saved}, the database is at {generation}"
        )
    built = store.faiss_info()
    if saved == generation:
        try:
            check_same_file(file, built)
        except ValueError as exc:
            problems.append(f"{VECTORS_FILE}: {exc}")
    try:
        vectors = VectorIndex.load(file, dim, factory=built.get("factory", "Flat"))
    except Exception as exc:
        return [*problems, f"{VECTORS_FILE} is unreadable: {exc}"]
    db_ids = store.vector_ids()
    vectors.bury_superseded(db_ids)
    file_ids = vectors.ids()
    if len(db_ids) != len(file_ids):
        problems.append(f"{VECTORS_FILE} holds {len(file_ids)} vectors, the database {len(db_ids)}")
    elif not np.array_equal(db_ids, file_ids):
        problems.append(f"the ids in {VECTORS_FILE} differ from the database's")
    elif vectors.exact_scores:  # compressed codes cannot be compared bit for bit
        differ = 0
        for ids, vecs in vectors.items():
            stored = store.vectors_by_id(ids)
            differ += sum(
                1
                for i, v in zip(ids.tolist(), vecs, strict=True)
                if i not in stored or not np.allclose(stored[i], v, atol=1e-6)
            )
        if differ:
            problems.append(f"{differ} vectors in {VECTORS_FILE} differ from the database's")
    return problems
