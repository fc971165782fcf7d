"""One file is one file: --delete and --move-to never remove the only copy of a picture,
whatever groups they are handed (aliases through symlinked folders, file symlinks, hard
links), never act through a symbolic link, and put a moved symlink back as it was.

The groups are built by hand here, as a buggy or hostile caller could hand them over: the
actions must be safe on their own, whatever `duplicates()` pairs."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from test_moves import run, snapshot

from simsearch import Index
from simsearch.records import Duplicate, DuplicateGroup


def everything(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: regular files by bytes and mtime, links by target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file():
            out[key] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def group(idx: Index, keep: Path, *dups: Path) -> DuplicateGroup:
    known = idx.store.known_files()
    return DuplicateGroup(
        keep_id=known[str(keep)].id,
        keep_path=str(keep),
        duplicates=tuple(Duplicate(id=known[str(d)].id, path=str(d), score=1.0) for d in dups),
    )


def verified(index: Path) -> set[str]:
    with Index.open(index) as idx:
        assert idx.verify() == []
        return set(idx.store.known_files())


@pytest.fixture
def aliased(tmp_path, tiny_vit, photo_dir):
    """photo_dir with: a symlinked folder `alias` -> `real` (both indexed), a file symlink
    `link.jpg` -> img0.jpg, a hard link `hard.jpg` of img0.jpg, and a real copy of img0.jpg
    (`copy.jpg`, another inode)."""
    real = photo_dir / "real"
    real.mkdir()
    shutil.copyfile(photo_dir / "img2.jpg", real / "a.jpg")
    shutil.copyfile(photo_dir / "img3.png", real / "b.png")
    (photo_dir / "alias").symlink_to("real")
    (photo_dir / "link.jpg").symlink_to("img0.jpg")
    os.link(photo_dir / "img0.jpg", photo_dir / "hard.jpg")
    shutil.copy2(photo_dir / "img0.jpg", photo_dir / "copy.jpg")
    index = tmp_path / "index"
    with Index.create(index, tiny_vit) as idx:
        idx.add([photo_dir, photo_dir / "alias"])
        known = idx.store.known_files()
    assert str(photo_dir / "alias" / "a.jpg") in known and str(real / "a.jpg") in known
    return photo_dir, index


@pytest.mark.parametrize("action", ["delete", "move"])
def test_aliases_of_one_file_are_never_acted_on(tmp_path, aliased, action):
    folder, index = aliased
    before, indexed = everything(folder), verified(index)
    with Index.open(index) as idx:
        groups = [
            group(idx, folder / "real" / "a.jpg", folder / "alias" / "a.jpg"),
            group(idx, folder / "alias" / "b.png", folder / "real" / "b.png"),
            group(idx, folder / "link.jpg", folder / "img0.jpg"),
            group(idx, folder / "img0.jpg", folder / "hard.jpg"),
        ]
        if action == "delete":
            report = idx.delete_duplicates(groups)
        else:
            report = idx.move_duplicates(groups, tmp_path / "dups")
    assert report.files == 0
    reasons = dict(report.skipped)
    assert len(reasons) == 4
    assert all("the same file as the kept image" in why for why in reasons.values()), reasons
    assert everything(folder) == before
    assert verified(index) == indexed


def test_a_duplicate_that_is_the_same_file_as_another_groups_kept_image_stays(aliased):
    folder, index = aliased
    before = everything(folder)
    with Index.open(index) as idx:
        groups = [
            group(idx, folder / "copy.jpg", folder / "img0.jpg"),
            group(idx, folder / "hard.jpg", folder / "img4.jpg"),  # keeps img0's inode
        ]
        report = idx.delete_duplicates(groups)
    assert report.files == 1  # img4.jpg
    assert "the same file as the kept image" in dict(report.skipped)[str(folder / "img0.jpg")]
    assert everything(folder)["img0.jpg"] == before["img0.jpg"]


def test_two_duplicates_that_are_one_file_are_not_both_removed(aliased):
    folder, index = aliased
    before = everything(folder)
    with Index.open(index) as idx:
        report = idx.delete_duplicates(
            [group(idx, folder / "copy.jpg", folder / "img0.jpg", folder / "hard.jpg")]
        )
    assert report.files == 1
    [(path, why)] = report.skipped
    assert "the same file as" in why and "this run" in why
    survivor = folder / ("hard.jpg" if path.endswith("hard.jpg") else "img0.jpg")
    assert survivor.read_bytes() == before["img0.jpg"][0]


def test_a_symlinked_folder_swapped_in_below_the_root_is_not_followed(tmp_path, aliased):
    folder, index = aliased
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder / "real", elsewhere)  # same bytes; copy2 keeps the mtimes
    shutil.rmtree(folder / "real")
    (folder / "real").symlink_to(elsewhere)  # swapped in after indexing
    before = everything(elsewhere)
    with Index.open(index) as idx:
        report = idx.delete_duplicates([group(idx, folder / "img2.jpg", folder / "real/a.jpg")])
    assert report.files == 0
    assert "symbolic link" in dict(report.skipped)[str(folder / "real" / "a.jpg")]
    assert everything(elsewhere) == before


@pytest.fixture
def linked(tmp_path, tiny_vit, photo_dir):
    """photo_dir with `link.jpg`, a relative symlink to a byte copy of img0.jpg outside the
    indexed folder; returns (folder, index, the copy)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(photo_dir / "img0.jpg", outside / "img0-copy.jpg")
    (photo_dir / "sub" / "link.jpg").symlink_to(
        os.path.join("..", "..", "outside", "img0-copy.jpg")
    )
    index = tmp_path / "index"
    with Index.create(index, tiny_vit) as idx:
        idx.add(photo_dir)
    return photo_dir, index, outside / "img0-copy.jpg"


def test_deleting_a_symlinked_duplicate_removes_the_link_not_its_target(linked):
    folder, index, target = linked
    data = target.read_bytes()
    with Index.open(index) as idx:
        report = idx.delete_duplicates([group(idx, folder / "img0.jpg", folder / "sub/link.jpg")])
    assert report.files == 1
    assert not (folder / "sub" / "link.jpg").is_symlink()
    assert target.read_bytes() == data and (folder / "img0.jpg").exists()


@pytest.mark.parametrize("cross_device", [False, True])
def test_a_moved_relative_symlink_is_moved_as_a_link_and_put_back(
    tmp_path, linked, monkeypatch, cross_device
):
    folder, index, target = linked
    before, indexed, data = everything(folder), verified(index), target.read_bytes()
    if cross_device:
        real_rename = os.rename

        def rename(source, dest, **kw):
            if "simsearch" not in os.path.basename(source):  # simsearch's own partial copy
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_rename(source, dest, **kw)

        monkeypatch.setattr("simsearch.fs.files.os.rename", rename)
    dups = tmp_path / "aside" / "dups"  # where the moved relative link points at nothing
    with Index.open(index) as idx:
        report = idx.move_duplicates(
            [group(idx, folder / "img0.jpg", folder / "sub" / "link.jpg")], dups
        )
        assert report.files == 1, report.skipped
        moved = dups / "sub" / "link.jpg"
        assert moved.is_symlink() and os.readlink(moved) == before["sub/link.jpg"][1]
        assert target.read_bytes() == data
        undone = idx.undo_moves(report.manifest)
    assert undone.files == 1, undone.skipped
    assert everything(folder) == before
    assert verified(index) == indexed


def test_a_users_partial_file_beside_a_cross_device_move_is_not_touched(
    tmp_path, linked, monkeypatch
):
    folder, index, _ = linked
    dups = tmp_path / "dups"
    mine = dups / "img2.jpg.simsearch-partial"
    dups.mkdir()
    mine.write_bytes(b"my own notes")
    real_rename = os.rename

    def rename(source, dest, **kw):
        if "simsearch" not in os.path.basename(source):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(source, dest, **kw)

    monkeypatch.setattr("simsearch.fs.files.os.rename", rename)
    shutil.copy2(folder / "img2.jpg", folder / "img2-copy.jpg")
    with Index.open(index) as idx:
        idx.add(folder)
        report = idx.move_duplicates(
            [group(idx, folder / "img2-copy.jpg", folder / "img2.jpg")], dups
        )
    assert report.files == 1, report.skipped
    assert mine.read_bytes() == b"my own notes"
    assert (dups / "img2.jpg").read_bytes() == (folder / "img2-copy.jpg").read_bytes()


def test_cli_says_why_an_alias_is_left_alone(aliased, monkeypatch):
    """dedup lists aliases as the same file, never as duplicates, and --delete keeps them:
    only real copies (other inodes) go: copy.jpg, and real/a.jpg and real/b.png, byte copies
    of img2.jpg and img3.png."""
    folder, index = aliased
    before = snapshot(folder)
    done = run("dedup", "--index", index, "--threshold", "0.9999", "--delete", "--yes")
    assert done.exit_code == 0, done.output
    assert "same file" in done.stdout and "left alone" in done.stdout
    assert done.stderr.splitlines()[-1].startswith("deleted 3 files")
    left = {data for data, _ in snapshot(folder).values()}
    assert all(data in left for data, _ in before.values())  # a copy of every picture
    verified(index)


def test_a_group_naming_a_path_the_index_does_not_know_by_that_id_is_refused(tmp_path, aliased):
    """The path acted on is the one the index holds for the id, never the caller's string."""
    folder, index = aliased
    victim = tmp_path / "victim.jpg"
    shutil.copy2(folder / "img0.jpg", victim)
    with Index.open(index) as idx:
        real = group(idx, folder / "copy.jpg", folder / "img4.jpg")
        forged = DuplicateGroup(
            keep_id=real.keep_id,
            keep_path=real.keep_path,
            duplicates=(Duplicate(id=real.duplicates[0].id, path=str(victim), score=1.0),),
        )
        report = idx.delete_duplicates([forged])
    assert report.files == 0 and "the index knows image" in report.skipped[0][1]
    assert victim.exists() and (folder / "img4.jpg").exists()
