"""The database's schema version and its migrations: indexes made before versions upgrade
once on open, keep every row, and end with the schema a new index has."""

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from simsearch import Index
from simsearch.errors import IndexFormatError
from simsearch.storage import schema
from simsearch.storage.manifest import DATABASE_FILE
from simsearch.storage.store import Store

# Made by simsearch at fb510ab (the last commit before schema versions) with
# tests/data/make_index_before_schema_versions.py: 6 images, 1 failed file, 2 clusters.
BEFORE_VERSIONS = Path(__file__).parent / "data" / "index-before-schema-versions"


def layout(db_path: Path) -> dict[str, object]:
    """Every table's columns (name, type, not null, primary key) and every index's columns."""
    db = sqlite3.connect(db_path)
    try:
        out: dict[str, object] = {}
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ):
            columns = db.execute(f"PRAGMA table_info({name})").fetchall()
            out[name] = sorted((c[1], c[2], c[3], c[5]) for c in columns)
        for name, table in db.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' ORDER BY name"
        ):
            out[f"index {name}"] = (table, [r[2] for r in db.execute(f"PRAGMA index_info({name})")])
        return out
    finally:
        db.close()


def version_of(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


@pytest.fixture
def old_index(tmp_path) -> Path:
    path = tmp_path / "old"
    shutil.copytree(BEFORE_VERSIONS, path)
    return path


@pytest.fixture
def new_layout(tmp_path) -> dict[str, object]:
    store = Store(tmp_path / "new.sqlite", create=True)
    store.close()
    assert version_of(tmp_path / "new.sqlite") == schema.SCHEMA_VERSION
    return layout(tmp_path / "new.sqlite")


def test_an_index_made_before_versions_upgrades_once_on_open_and_keeps_everything(
    old_index, new_layout
):
    db = old_index / DATABASE_FILE
    assert version_of(db) == 0
    with sqlite3.connect(db) as raw:
        before = {
            table: raw.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("images", "vectors", "clusters", "meta")
        }
    with Index.open(old_index) as index:
        assert version_of(db) == schema.SCHEMA_VERSION
        assert layout(db) == new_layout
        info = index.info()
        assert (len(index), info.failed, info.clustering.clusters) == (6, 1, 2)
        assert [f.path.endswith("broken.jpg") for f in index.failed()] == [True]
        assert sum(c.size for c in index.clusters()) == 6
        assert index.search(1, k=3)[0].id == 1
        assert index.verify() == []
        assert index.store.migrate() == []  # current: nothing to do
        index.cluster(3)  # a write on the migrated database
        assert index.info().clustering.clusters == 3
    with sqlite3.connect(db) as raw:
        for table in ("images", "vectors", "meta"):
            after = raw.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            if table == "images":  # the migration adds three empty columns at the end
                after = [row[: len(before[table][0])] for row in after]
            if table != "meta":  # meta: the clustering run and generations changed
                assert after == before[table], table


def test_every_older_layout_migrates_to_the_schema_a_new_index_has(tmp_path, new_layout):
    """The layouts released before versions: no labels or clusters table, no format,
    lossless or device column, no id index on vectors."""
    db_path = tmp_path / "oldest.sqlite"
    Store(db_path, create=True).close()
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TABLE labels")
        db.execute("DROP TABLE clusters")
        db.execute("DROP INDEX ix_vectors_image_id")
        for column in ("format", "lossless", "device"):
            db.execute(f"ALTER TABLE images DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 0")
    store = Store(db_path)
    assert store.schema_version == 0
    assert store.migrate() == [1]
    store.close()
    assert layout(db_path) == new_layout
    assert version_of(db_path) == schema.SCHEMA_VERSION


def test_a_migration_that_fails_half_way_leaves_the_old_schema_whole(
    tmp_path, monkeypatch, new_layout
):
    db_path = tmp_path / "old.sqlite"
    Store(db_path, create=True).close()
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TABLE clusters")
        db.execute("ALTER TABLE images DROP COLUMN device")
        db.execute("PRAGMA user_version = 0")
    before = layout(db_path)
    real = schema.MIGRATIONS[0]

    def crash_after_the_ddl(conn):
        real(conn)
        raise KeyboardInterrupt  # as Ctrl-C or a kill between the DDL and the version

    monkeypatch.setattr(schema, "MIGRATIONS", [crash_after_the_ddl])
    store = Store(db_path)
    with pytest.raises(KeyboardInterrupt):
        store.migrate()
    assert layout(db_path) == before and version_of(db_path) == 0
    monkeypatch.setattr(schema, "MIGRATIONS", [real])
    assert store.migrate() == [1]
    store.close()
    assert layout(db_path) == new_layout


def test_two_processes_opening_an_old_index_migrate_it_once(tmp_path, new_layout):
    db_path = tmp_path / "old.sqlite"
    Store(db_path, create=True).close()
    with sqlite3.connect(db_path) as db:
        db.execute("ALTER TABLE images DROP COLUMN device")
        db.execute("PRAGMA user_version = 0")
    stores = [Store(db_path), Store(db_path)]
    steps: list[list[int]] = []
    start = threading.Barrier(2)

    def run(store):
        start.wait()
        steps.append(store.migrate())

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(steps) == [[], [1]]
    assert layout(db_path) == new_layout


def test_an_index_from_a_newer_simsearch_is_refused_and_left_alone(old_index):
    db = old_index / DATABASE_FILE
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA user_version = 99")
    before = layout(db)
    with pytest.raises(IndexFormatError, match="schema version 99, made by a newer simsearch"):
        Index.open(old_index)
    assert version_of(db) == 99 and layout(db) == before


def test_a_negative_schema_version_is_refused_and_no_migration_runs(old_index):
    """An edited database: MIGRATIONS[-1] would have run the last migration on it."""
    db = old_index / DATABASE_FILE
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA user_version = -1")
    before = layout(db)
    with pytest.raises(IndexFormatError, match="damaged: its schema version is -1"):
        Index.open(old_index)
    assert version_of(db) == -1 and layout(db) == before


def test_a_migration_sqlite_refuses_is_deferred_on_open_and_a_clear_error_on_write(
    old_index, monkeypatch, caplog
):
    """A writer holding the database past the busy timeout, a read-only file: opening reads
    the old schema as it is; a write says why it cannot go on, without a traceback."""
    from simsearch.errors import DatabaseOperationalError, SimsearchError

    def locked(conn):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(schema, "MIGRATIONS", [locked])
    with Index.open(old_index) as index:
        assert "schema migration deferred" in caplog.text
        assert version_of(old_index / DATABASE_FILE) == 0
        assert len(index) == 6 and index.search(1, k=1)[0].id == 1
        with pytest.raises(DatabaseOperationalError, match="database is locked") as raised:
            index.cluster(2)
        assert isinstance(raised.value, SimsearchError)
    assert version_of(old_index / DATABASE_FILE) == 0
