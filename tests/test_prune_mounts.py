"""Pruning never follows an unmount: files that are out of reach keep their index entries.

A disk mounted below an indexed folder, once unmounted, leaves its mount point as an empty
folder of the parent file system. Mounting needs privileges a test does not have, so the
unmounted state is made as it looks from user space: the mount point's contents gone, the
folder left (empty, or holding a stray file of the parent file system with the disk's files
recorded on another device).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import draw_image

from simsearch import Index


@pytest.fixture
def library(tmp_path, tiny_vit) -> tuple[Path, Path]:
    """photos/ (3 images) with a 'disk' below it (disk/2024/trip, 4 images), indexed, each
    with a label-like cluster assignment so a loss would show."""
    photos = tmp_path / "photos"
    (photos / "disk" / "2024" / "trip").mkdir(parents=True)
    for i in range(3):
        draw_image(i).save(photos / f"home{i}.png")
    for i in range(4):
        draw_image(10 + i).save(photos / "disk" / "2024" / "trip" / f"trip{i}.png")
    index = tmp_path / "index"
    with Index.create(index, model=tiny_vit) as idx:
        idx.add(photos)
        idx.cluster(2)
    return photos, index


def indexed_paths(index: Path) -> set[str]:
    with Index.open(index) as idx:
        return {Path(p).name for p in idx.store.paths(idx.store.vector_ids().tolist()).values()}


def unmount(disk: Path, stray: bool = False) -> Path:
    """Make `disk` look unmounted: its contents moved away (returned), the folder left."""
    away = disk.parent.parent / "away"
    shutil.move(str(disk), away)
    disk.mkdir()
    if stray:  # a file of the parent file system under the mount point
        (disk / ".keep").write_text("placeholder")
    return away


def test_an_unmounted_disk_below_an_indexed_folder_is_not_pruned(library, caplog):
    photos, index = library
    before = indexed_paths(index)
    away = unmount(photos / "disk")
    with caplog.at_level(logging.WARNING, logger="simsearch"), Index.open(index) as idx:
        summary = idx.add(photos)
        clustered = idx.store.clustered_count()
    assert summary.removed == 0
    assert indexed_paths(index) == before
    assert clustered == 7  # the disk's images kept their clusters
    notice = " ".join(r.getMessage() for r in caplog.records)
    assert "not removing 4 indexed files under" in notice and "empty now" in notice
    # Mounted again: nothing to do, nothing embedded again.
    shutil.rmtree(photos / "disk")
    shutil.move(str(away), photos / "disk")
    with Index.open(index) as idx:
        again = idx.add(photos)
    assert (again.indexed, again.removed, again.unchanged) == (0, 0, 7)


def test_a_mount_point_with_a_stray_file_is_told_by_its_device(library, caplog):
    photos, index = library
    # The disk's files were indexed on another device than the folder is on now.
    db = sqlite3.connect(index / "meta.sqlite")
    db.execute("UPDATE images SET device = device + 1 WHERE path LIKE '%/disk/%'")
    db.commit()
    db.close()
    before = indexed_paths(index)
    unmount(photos / "disk", stray=True)
    with caplog.at_level(logging.WARNING, logger="simsearch"), Index.open(index) as idx:
        assert idx.add(photos).removed == 0
    assert indexed_paths(index) == before
    assert "another file system" in caplog.text


def test_files_really_gone_are_still_pruned(library):
    photos, index = library
    (photos / "home0.png").unlink()  # one file deleted from a folder that still has images
    shutil.rmtree(photos / "disk")  # a whole folder deleted
    with Index.open(index) as idx:
        summary = idx.add(photos)
    assert summary.removed == 5
    assert indexed_paths(index) == {"home1.png", "home2.png"}


def test_a_deleted_file_beside_its_renumbered_siblings_is_pruned(library):
    """A disk that comes back with another device number (a USB disk in another port) still
    has its files; one deleted meanwhile is gone, not out of reach."""
    photos, index = library
    db = sqlite3.connect(index / "meta.sqlite")
    db.execute("UPDATE images SET device = device + 1 WHERE path LIKE '%/disk/%'")
    db.commit()
    db.close()
    (photos / "disk" / "2024" / "trip" / "trip0.png").unlink()
    with Index.open(index) as idx:
        assert idx.add(photos).removed == 1
        # The unchanged files' device is brought up to date.
        rows = idx.store.engine.raw_connection().execute("SELECT DISTINCT device FROM images")
        assert len(rows.fetchall()) == 1
