"""The Store's labels table: each image's top labels from a classification head, and what
made them (meta["labels"]). Label writes leave the generation alone: no vector changes."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from simsearch.fs.faults import crash_point
from simsearch.fs.names import from_column
from simsearch.records import Label
from simsearch.storage.base import ROWS_PER_STATEMENT, StoreBase, chunks, put_meta, table_exists
from simsearch.storage.schema import ImageRow, LabelRow, MetaRow


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
            return [
                (i, from_column(path), sha)
                for i, path, sha in conn.exec_driver_sql(
                    "SELECT i.id, i.path, i.sha256 FROM images i JOIN vectors v "
                    "ON v.image_id = i.id WHERE NOT EXISTS (SELECT 1 FROM labels l "
                    "WHERE l.image_id = i.id) ORDER BY i.id"
                )
            ]

    def labelled_count(self) -> int:
        """Return the number of images with stored labels (0 for indexes made before them)."""
        if not self._has_labels():
            return 0
        with self.engine.connect() as conn:
            return int(
                conn.exec_driver_sql("SELECT count(*) FROM labels WHERE rank = 1").scalar_one()
            )

    def write_labels(self, labels: dict[int, Sequence[Label]], source: dict) -> None:
        """Store the labels of some images, replacing theirs, and what made them, in one
        transaction. Images deleted meanwhile are skipped."""
        with Session(self.engine) as session, session.begin():
            ids = list(labels)
            live: set[int] = set()
            for chunk in chunks(ids):
                live.update(session.scalars(select(ImageRow.id).where(ImageRow.id.in_(chunk))))
            delete_labels(session, ids)
            rows = [
                dict(image_id=i, rank=rank, label=lab.label, score=float(lab.score))
                for i, found in labels.items()
                if i in live
                for rank, lab in enumerate(found, 1)
            ]
            for chunk in chunks(rows, ROWS_PER_STATEMENT):
                session.execute(insert(LabelRow).values(chunk))
            put_meta(session, "labels", json.dumps(source, sort_keys=True))
            crash_point("labels")

    def clear_labels(self) -> None:
        """Delete every stored label and the record of what made them."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(LabelRow))
            session.execute(delete(MetaRow).where(MetaRow.key == "labels"))

    def label_names(self) -> list[str]:
        """Return every distinct stored label (from the label index, not the table)."""
        if not self._has_labels():
            return []
        with self.engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT DISTINCT label FROM labels")]

    def ids_with_labels(self, names: Sequence[str]) -> np.ndarray:
        """Return the sorted ids of the images having any of `names` among their labels."""
        found: list[int] = []
        with self.engine.connect() as conn:
            for chunk in chunks(list(names)):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT image_id FROM labels WHERE label IN ({marks})"
                found += [r[0] for r in conn.exec_driver_sql(sql, tuple(chunk))]
        return np.unique(np.asarray(found, dtype=np.int64))

    def labels_of(self, ids: Sequence[int]) -> dict[int, list[Label]]:
        """Return id -> stored labels, best first, for each of `ids` that has some."""
        if not self._has_labels():
            return {}
        out: dict[int, list[Label]] = {}
        rows = self._rows_by_id("SELECT image_id, rank, label, score FROM labels", "image_id", ids)
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


def delete_labels(session: Session, ids: Sequence[int]) -> None:
    for chunk in chunks([int(i) for i in ids]):
        session.execute(delete(LabelRow).where(LabelRow.image_id.in_(chunk)))
