"""What the parts of the Store share: the engine and file they work on, the meta table,
and the chunking that keeps each statement under SQLite's limit on bound variables.

`store.Store` is made of the parts (images.py, vectors.py, labels.py, clusters.py,
integrity.py); each is a `StoreBase`, whose attributes `Store.__init__` sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    column,
    literal,
    select,
)
from sqlalchemy import table as table_clause
from sqlalchemy.dialects.sqlite import insert

from simsearch.storage import schema

# The tables (declared in schema.py) as SQLAlchemy Core statements name them. Every read
# and write in storage/ is a Core statement on these, run on a connection of the engine.
IMAGES: Table = schema.Base.metadata.tables["images"]
VECTORS: Table = schema.Base.metadata.tables["vectors"]
LABELS: Table = schema.Base.metadata.tables["labels"]
CLUSTERS: Table = schema.Base.metadata.tables["clusters"]
META: Table = schema.Base.metadata.tables["meta"]
# SQLite's catalogue, for the tables an older index may lack.
_SQLITE_MASTER = table_clause("sqlite_master", column("type"), column("name"))

_META_VALUE = select(META.c.value).where(META.c.key == bindparam("key"))

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
        with self.engine.connect() as conn:
            return conn.scalar(_META_VALUE, {"key": key})

    def _rows_by_id(self, stmt: Select, ids: Sequence[int] | np.ndarray) -> list[tuple]:
        """Run `stmt`, made by `by_ids`, for `ids`, in chunks under SQLite's limit on bound
        variables. These run on every search: the statements are built once, at import, so
        each call only binds the ids (SQLAlchemy caches the compiled form)."""
        rows: list[tuple] = []
        with self.engine.connect() as conn:
            for chunk in chunks([int(i) for i in ids]):
                rows += conn.execute(stmt, {"ids": chunk}).all()
        return rows


def by_ids(stmt: Select, column: ColumnElement) -> Select:
    """`stmt` for the rows whose `column` is in the list bound as "ids" (`_rows_by_id`)."""
    return stmt.where(column.in_(bindparam("ids", expanding=True)))


def chunks(items: Sequence, size: int = IDS_PER_STATEMENT) -> Iterator[Sequence]:
    """Yield consecutive slices of `items`, each at most `size` long."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def put_meta(conn: Connection, key: str, value: str) -> None:
    conn.execute(
        insert(META)
        .values(key=key, value=value)
        .on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )


def bump_generation(conn: Connection) -> None:
    current = conn.scalar(select(META.c.value).where(META.c.key == "generation"))
    put_meta(conn, "generation", str(int(current or 0) + 1))


def table_columns(conn: Connection, table: str) -> set[str]:
    # A PRAGMA has no Core form: driver SQL, on a name of ours, never a user's.
    return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}


def table_exists(conn: Connection, table: str) -> bool:
    """Return True when `table` exists: older indexes lack newer tables until a write."""
    found = conn.execute(
        select(literal(1)).where(_SQLITE_MASTER.c.type == "table", _SQLITE_MASTER.c.name == table)
    ).first()
    return found is not None


def has_rows(conn: Connection, table: str) -> bool:
    """Return True when `table` exists and has a row."""
    if not table_exists(conn, table):
        return False
    found = conn.execute(
        select(literal(1)).select_from(schema.Base.metadata.tables[table]).limit(1)
    )
    return found.first() is not None
