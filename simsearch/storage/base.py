"""What the parts of the Store share: the engine and file they work on, the meta table,
and the chunking that keeps each statement under SQLite's limit on bound variables.

`store.Store` is made of the parts (images.py, vectors.py, labels.py, clusters.py,
integrity.py); each is a `StoreBase`, whose attributes `Store.__init__` sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from simsearch.storage import schema
from simsearch.storage.schema import MetaRow

# Rows fetched per round trip when streaming vectors out, to keep memory flat on big indexes.
FETCH_ROWS = 10_000

# Rows per multi-row statement: 9 columns x 100 rows stays far below SQLite's limit on bound
# variables, and one statement per 100 rows costs a fraction of one per row.
ROWS_PER_STATEMENT = 100

# Ids per `IN (...)` list, under SQLite's limit on bound variables.
IDS_PER_STATEMENT = 500


class StoreBase:
    """The state every part of the Store works on (set by `Store.__init__`)."""

    path: Path
    engine: Engine
    # The manifest's dimension, once read: stored vectors are checked against it.
    dim: int | None
    _version: int | None

    @property
    def schema_version(self) -> int:
        """The schema version of the database (0: made before versions)."""
        if self._version is None:
            self._version = schema.version(self.engine)
        return self._version

    def _get_meta(self, key: str) -> str | None:
        with Session(self.engine) as session:
            return session.scalar(select(MetaRow.value).where(MetaRow.key == key))

    def _rows_by_id(self, select: str, column: str, ids: Sequence[int] | np.ndarray) -> list[tuple]:
        """Run `select ... WHERE column IN (ids)` in chunks under SQLite's variable limit,
        as plain SQL (these run on every search, where the ORM costs more than SQLite)."""
        rows: list[tuple] = []
        with self.engine.connect() as conn:
            for chunk in chunks([int(i) for i in ids]):
                marks = ",".join("?" * len(chunk))
                sql = f"{select} WHERE {column} IN ({marks})"
                rows += conn.exec_driver_sql(sql, tuple(chunk)).all()
        return rows


def chunks(items: Sequence, size: int = IDS_PER_STATEMENT) -> Iterator[Sequence]:
    """Yield consecutive slices of `items`, each at most `size` long."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def put_meta(session: Session | Connection, key: str, value: str) -> None:
    session.execute(
        insert(MetaRow)
        .values(key=key, value=value)
        .on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )


def bump_generation(session: Session) -> None:
    current = session.scalar(select(MetaRow.value).where(MetaRow.key == "generation"))
    put_meta(session, "generation", str(int(current or 0) + 1))


def table_columns(conn, table: str) -> set[str]:
    return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}


def table_exists(conn, table: str) -> bool:
    """Return True when `table` exists: older indexes lack newer tables until a write."""
    found = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).first()
    return found is not None


def has_rows(conn, table: str) -> bool:
    """Return True when `table` exists and has a row."""
    if not table_exists(conn, table):
        return False
    return conn.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 1").first() is not None
