"""The Store's labels table: each image's top labels from a classification head, and what
made them (meta["labels"]). Label writes leave the generation alone: no vector changes."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from sqlalchemy import Connection, delete, exists, func, insert, select

from simsearch.fs.faults import crash_point
from simsearch.records import Label
from simsearch.storage.base import (
    IMAGES,
    LABELS,
    META,
    ROWS_PER_STATEMENT,
    VECTORS,
    StoreBase,
    by_ids,
    chunks,
    put_meta,
    table_exists,
)

# Every search that shows labels reads them by id: built once.
_LABELS_OF = by_ids(
    select(LABELS.c.image_id, LABELS.c.rank, LABELS.c.label, LABELS.c.score), LABELS.c.image_id
)


class LabelsPart(StoreBase):
    """The labels table."""

    def label_source(self) -> dict | None:
        """Return what made the stored labels (model, weights_sha256, revision, top), or None
        when the index has no labels."""
        text = self._get_meta("labels")
        return None if text is None else json.loads(text)

    def unlabelled(self) -> list[tuple[int, str, str | None]]:
        """Return (id, path, sha256) of every image with a vector and no labels, by id."""
        with self.engine.connect() as conn:
            stmt = (
                select(IMAGES.c.id, IMAGES.c.path, IMAGES.c.sha256)
                .join_from(IMAGES, VECTORS, VECTORS.c.image_id == IMAGES.c.id)
                .where(~exists().where(LABELS.c.image_id == IMAGES.c.id))
                .order_by(IMAGES.c.id)
            )
            return [(i, path, sha) for i, path, sha in conn.execute(stmt)]

    def labelled_count(self) -> int:
        """Return the number of images with stored labels (0 for indexes made before them)."""
        if not self._has_labels():
            return 0
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(LABELS).where(LABELS.c.rank == 1)
                ).scalar_one()
            )

    def write_labels(self, labels: dict[int, Sequence[Label]], source: dict) -> None:
        """Store the labels of some images, replacing theirs, and what made them, in one
        transaction. Images deleted meanwhile are skipped."""
        with self.engine.begin() as conn:
            ids = list(labels)
            live: set[int] = set()
            for chunk in chunks(ids):
                live.update(conn.scalars(select(IMAGES.c.id).where(IMAGES.c.id.in_(chunk))))
            delete_labels(conn, ids)
            rows = [
                dict(image_id=i, rank=rank, label=lab.label, score=float(lab.score))
                for i, found in labels.items()
                if i in live
                for rank, lab in enumerate(found, 1)
            ]
            for chunk in chunks(rows, ROWS_PER_STATEMENT):
                conn.execute(insert(LABELS).values(chunk))
            put_meta(conn, "labels", json.dumps(source, sort_keys=True))
            crash_point("labels")

    def clear_labels(self) -> None:
        """Delete every stored label and the record of what made them."""
        with self.engine.begin() as conn:
            conn.execute(delete(LABELS))
            conn.execute(delete(META).where(META.c.key == "labels"))

    def label_names(self) -> list[str]:
        """Return every distinct stored label (from the label index, not the table)."""
        if not self._has_labels():
            return []
        with self.engine.connect() as conn:
            return list(conn.scalars(select(LABELS.c.label).distinct()))

    def ids_with_labels(self, names: Sequence[str]) -> np.ndarray:
        """Return the sorted ids of the images having any of `names` among their labels."""
        found: list[int] = []
        with self.engine.connect() as conn:
            for chunk in chunks(list(names)):
                found += conn.scalars(
                    select(LABELS.c.image_id).where(LABELS.c.label.in_(chunk))
                ).all()
        return np.unique(np.asarray(found, dtype=np.int64))

    def labels_of(self, ids: Sequence[int]) -> dict[int, list[Label]]:
        """Return id -> stored labels, best first, for each of `ids` that has some."""
        if not self._has_labels():
            return {}
        out: dict[int, list[Label]] = {}
        rows = self._rows_by_id(_LABELS_OF, ids)
        for image_id, _, label, score in sorted(rows):
            out.setdefault(int(image_id), []).append(Label(label, float(score)))
        return out

    def _has_labels(self) -> bool:
        """Return True when the labels table exists: an index made before labels lacks it
        until it is migrated (read-only storage), and readers treat that as no labels."""
        if self.schema_version >= 1:
            return True
        with self.engine.connect() as conn:
            return table_exists(conn, "labels")


def delete_labels(conn: Connection, ids: Sequence[int]) -> None:
    for chunk in chunks([int(i) for i in ids]):
        conn.execute(delete(LABELS).where(LABELS.c.image_id.in_(chunk)))
