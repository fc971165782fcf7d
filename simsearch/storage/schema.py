"""The SQLite schema of an index, and its numbered migrations.

The tables are declared once here (SQLAlchemy); the database's `PRAGMA user_version` is the
schema version it holds. `migrate` brings an older database to `SCHEMA_VERSION` when a
writable index is opened, once: each step is DDL in one `BEGIN IMMEDIATE` transaction with
the version bump, so a crash leaves the old version whole and two processes never both run
a step. A database of a newer version than this code knows is refused, not guessed at.

Adding a migration: write `_to_N(conn)` (DDL on a DB-API connection), append it to
MIGRATIONS, raise SCHEMA_VERSION to N, and keep the declarations below in step, since a new
database is made from them at version SCHEMA_VERSION directly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text, TypeDecorator
from sqlalchemy import Index as SqlIndex
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable

from simsearch.errors import IndexFormatError
from simsearch.fs.names import from_column, to_column


class Base(DeclarativeBase):
    pass


class FsPath(TypeDecorator):
    """A file path, kept losslessly: TEXT when the name is UTF-8, else a BLOB of its bytes.

    SQLite is dynamically typed, so the one UNIQUE column holds both, and a BLOB never
    equals a TEXT: b"caf\\xe9.jpg" and a file literally named "caf\\xe9.jpg" are two rows.
    In Python the path is always the os.fsdecode str: storage/'s statements (SQLAlchemy
    Core on these tables) convert through this type, min(path) and max(path) included.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else to_column(value)

    def process_result_value(self, value, dialect):
        return from_column(value)


class ImageRow(Base):
    __tablename__ = "images"
    # AUTOINCREMENT: an id is never reused, so a stale FAISS id can never name a new image.
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 (SQLAlchemy reads it)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # The true pixel size from the file's header, as displayed (not the draft-mode decode).
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # Pillow's format name and whether the encoding is lossless: dedup's keep rule. NULL in
    # rows of indexes made before they were recorded (their width and height were the draft
    # decode's): the next `index` run reads them from the headers, and dedup until then.
    format: Mapped[str | None] = mapped_column(String(16))
    lossless: Mapped[int | None] = mapped_column(Integer)
    # st_dev of the file when indexed: a file gone with its whole file system (an unmounted
    # disk) is not pruned.
    device: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    indexed_at: Mapped[float] = mapped_column()


class VectorRow(Base):
    __tablename__ = "vectors"
    # The rows are 3-4 KB blobs, so walking the table for its ids (on every load of the FAISS
    # file) or counting it reads every vector; this index of ids alone is ~100x smaller.
    __table_args__ = (SqlIndex("ix_vectors_image_id", "image_id"),)

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, dim values


class LabelRow(Base):
    """An image's top labels from the classification head named in meta["labels"]; rank 1
    is the best guess. Label writes leave the generation alone: they change no vector."""

    __tablename__ = "labels"
    # By label: `search --label` looks up the images having one.
    __table_args__ = (SqlIndex("ix_labels_label", "label"),)

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column()


class ClusterRow(Base):
    """An image's cluster in the last `cluster` run (images added since have none)."""

    __tablename__ = "clusters"
    # (cluster, score): a cluster's members and its most central images without a scan.
    __table_args__ = (SqlIndex("ix_clusters_cluster_score", "cluster", "score"),)

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    cluster: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column()  # cosine similarity to the cluster's centre


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# -- versions ------------------------------------------------------------------------------

# Databases made before schema versions hold user_version 0, in any of the layouts released
# before it (without the labels or clusters tables, without the images columns format,
# lossless and device, without the vectors' id index): version 1 is all of them made whole.
SCHEMA_VERSION = 1


def _to_1(conn: sqlite3.Connection) -> None:
    """The first versioned schema: every table and index declared above that is missing,
    and the images columns added since the first release."""
    have = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    for table in Base.metadata.sorted_tables:
        if table.name not in have:
            conn.execute(str(CreateTable(table).compile(dialect=_DIALECT)))
    columns = {row[1] for row in conn.execute("PRAGMA table_info(images)")}
    for column in ("format", "lossless", "device"):
        if column not in columns:
            kind = ImageRow.__table__.c[column].type.compile(dialect=_DIALECT)
            conn.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            if index.name not in have:
                conn.execute(str(CreateIndex(index).compile(dialect=_DIALECT)))


# MIGRATIONS[n - 1] takes a database from version n - 1 to n.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_to_1]


_DIALECT = sqlite.dialect()


def version(engine: Engine) -> int:
    """Return the schema version the database at `engine` holds."""
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())


def check_version(found: int, where: str) -> None:
    """Raise IndexFormatError when a database's schema version is newer than this code's,
    or is no version at all (negative: SQLite never writes one; MIGRATIONS[found] would
    then run a migration from the end of the list)."""
    if found < 0:
        raise IndexFormatError(
            f"{where} is damaged: its schema version is {found}; restore it from a backup, "
            "or build a new index"
        )
    if found > SCHEMA_VERSION:
        raise IndexFormatError(
            f"{where} has schema version {found}, made by a newer simsearch (this one reads "
            f"up to {SCHEMA_VERSION}); upgrade simsearch to use this index"
        )


def create(engine: Engine) -> None:
    """Make every table of a new database, at the current schema version."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def migrate(engine: Engine, where: str) -> list[int]:
    """Bring the database to SCHEMA_VERSION; return the versions it stepped through (empty
    when it was current). Waits for a writer's transaction like any write (busy timeout)."""
    done: list[int] = []
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, sqlite3.Connection)
        saved = conn.isolation_level
        conn.isolation_level = None  # autocommit: the transactions below are explicit
        try:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
                    check_version(found, where)
                    if found == SCHEMA_VERSION:
                        conn.execute("ROLLBACK")
                        return done
                    MIGRATIONS[found](conn)
                    conn.execute(f"PRAGMA user_version = {found + 1}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                done.append(found + 1)
        finally:
            conn.isolation_level = saved
    finally:
        raw.close()
