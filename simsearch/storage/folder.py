"""IndexFolder: one index's folder on disk, its database, manifest and writer's lock.

It opens and validates what is there (a damaged database, a damaged manifest that
manifest.json stands in for, an older schema to migrate, a newer one to refuse), makes new
index folders atomically, writes a changed manifest in both places, and holds the write
session: the lock, the tidying of what a crash left, the migration.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from simsearch import config
from simsearch.errors import (
    DatabaseError,
    DatabaseOperationalError,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
)
from simsearch.fs.files import remove_temp_leftovers, replaced_atomically
from simsearch.fs.lock import WriteLock
from simsearch.storage.manifest import DATABASE_FILE, MANIFEST_FILE, Manifest
from simsearch.storage.schema import SCHEMA_VERSION
from simsearch.storage.store import Store, database_message

log = logging.getLogger(__name__)


class IndexFolder:
    """The folder of one index: `store`, `manifest`, the write lock. Open with `open`."""

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path
        self.store = store
        self.lock = WriteLock(path)
        # Set when the database's manifest is damaged and manifest.json stands in for it:
        # reading goes on, writing waits for `repair`.
        self.manifest_from_file = False
        self.repairing = False
        # Called on taking the lock (after the migration): the FAISS cache forgets an
        # in-memory index another process's writes made stale.
        self.on_write: list[Callable[[], None]] = []
        try:
            manifest = store.manifest()
        except DatabaseError as exc:
            store.close()
            raise IndexFormatError(damaged(path, exc)) from None
        except IndexFormatError as exc:
            # The database's copy is damaged: manifest.json, written after it on every
            # change, stands in for reading and for `repair`, which writes it back.
            manifest = manifest_file(path)
            if manifest is None or "version" in str(exc):
                store.close()
                raise
            log.warning("%s; using %s (repairing the index restores it)", exc, MANIFEST_FILE)
            store.dim = manifest.dim
            self.manifest_from_file = True
        except BaseException:
            store.close()
            raise
        if manifest is None:
            store.close()
            raise IndexFormatError(f"{path} has a database but no manifest: it is not an index")
        _bring_up_to_date(store, path)
        self.manifest: Manifest = manifest

    @classmethod
    def open(cls, path: Path) -> IndexFolder:
        if not (path / DATABASE_FILE).is_file():
            raise IndexNotFoundError(f"no index at {path}", path=path, fix="create-index")
        return cls(path, Store(path / DATABASE_FILE))

    @classmethod
    def create(cls, path: Path, manifest: Manifest) -> IndexFolder:
        """Make a new index folder holding `manifest`; IndexExistsError if one is there.
        Another process creating it at the same time is waited for, as writers wait."""
        path.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(path)
        lock.acquire(wait=config.LOCK_WAIT_SECONDS)
        try:
            if (path / DATABASE_FILE).exists():
                raise IndexExistsError(f"an index already exists at {path}; open it instead")
            create_database(path, manifest)
        finally:
            lock.release()
        return cls(path, Store(path / DATABASE_FILE))

    def set_manifest(self, manifest: Manifest) -> None:
        """Record a changed setting in the database, then in manifest.json (hold the lock)."""
        self.store.set_manifest(manifest)
        write_atomic(self.path / MANIFEST_FILE, manifest.to_json() + "\n")
        self.manifest = manifest

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock for the block, and tidy what a crash left behind."""
        if self.lock.held:
            yield
            return
        if self.manifest_from_file and not self.repairing:
            raise IndexFormatError(
                f"the manifest in {self.path / DATABASE_FILE} is damaged; repair the index "
                f"(which restores it from {MANIFEST_FILE}) before changing it",
                fix="repair",
            )
        self.lock.acquire(wait=config.LOCK_WAIT_SECONDS)
        try:
            remove_temp_leftovers(self.path)  # only names simsearch makes, never a user's
            self.store.migrate()
            if not self.repairing:  # a damaged generation is what repair renews
                for hook in self.on_write:
                    hook()
            yield
        finally:
            self.lock.release()

    def damaged(self, cause) -> str:
        return damaged(self.path, cause)

    def close(self) -> None:
        self.lock.release()
        self.store.close()


def _bring_up_to_date(store: Store, path: Path) -> None:
    """Refuse a database made by a newer simsearch; migrate an older one where it may be
    written. A migration that cannot run now (a read-only file, a writer holding the
    database past the busy timeout) is left to the next write, which runs it or fails."""
    try:
        store.check_schema()
        if not store.read_only and store.schema_version < SCHEMA_VERSION:
            done = store.migrate()
            if done:
                log.info("%s: schema migrated to version %d", path, done[-1])
    except DatabaseOperationalError as exc:
        reason = getattr(exc, "orig", None) or exc
        log.warning("%s: schema migration deferred to the next write: %s", path, reason)
    except DatabaseError as exc:
        store.close()
        raise IndexFormatError(damaged(path, exc)) from None
    except BaseException:
        store.close()
        raise


def manifest_file(path: Path) -> Manifest | None:
    """The index's manifest.json, or None when it is missing or damaged too."""
    try:
        return Manifest.from_json(
            (path / MANIFEST_FILE).read_text(encoding="utf-8"), str(path / MANIFEST_FILE)
        )
    except (OSError, ValueError, IndexFormatError):
        return None


def damaged(path: Path, cause) -> str:
    """The message for a database SQLite could not use: the storage's fault, or damage."""
    return database_message(getattr(cause, "orig", None) or cause, path / DATABASE_FILE)


def create_database(path: Path, manifest: Manifest) -> None:
    """Write a new database holding `manifest`, and manifest.json beside it, atomically."""
    # Build the database under a temporary name and rename it into place, so a crash never
    # leaves a half-made index that later runs would trip over.
    with replaced_atomically(path / DATABASE_FILE) as tmp:
        store = Store(tmp, create=True)
        store.set_manifest(manifest)
        store.close()
    write_atomic(path / MANIFEST_FILE, manifest.to_json() + "\n")


def write_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
