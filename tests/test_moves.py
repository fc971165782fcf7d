"""Acting on duplicates: --move-to then --undo restores every file byte for byte and the
index with it; --delete needs --yes; changed files are left alone; a crash mid-way loses
nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from simsearch import Index
from simsearch.cli import cli as main


@pytest.fixture
def library(tmp_path, tiny_vit, photo_dir) -> tuple[Path, Path]:
    """photo_dir plus byte copies of three of its images in backup/ (one nested deeper),
    indexed together; returns (the folder, the index)."""
    backup = photo_dir / "backup"
    (backup / "deep").mkdir(parents=True)
    for name, dest in [
        ("img0.jpg", backup / "img0.jpg"),
        ("img1.png", backup / "img1-copy.png"),
        ("img2.jpg", backup / "deep" / "img2.jpg"),
    ]:
        shutil.copyfile(photo_dir / name, dest)
        os.utime(dest, ns=(2_000_000_000_000_000_000,) * 2)  # newer: the originals are kept
    index = tmp_path / "index"
    with Index.create(index, tiny_vit) as idx:
        idx.add(photo_dir)
    return photo_dir, index


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def indexed_paths(index: Path) -> set[str]:
    with Index.open(index) as idx:
        assert idx.verify() == []
        return set(idx.store.known_files())


def test_move_to_then_undo_restores_every_file_byte_for_byte(tmp_path, library):
    folder, index = library
    before, paths_before = snapshot(folder), indexed_paths(index)
    target = tmp_path / "dups"
    moved = run("dedup", "--index", index, "--threshold", "0.9999", "--move-to", target, "--json")
    assert moved.exit_code == 0, moved.output
    groups = [json.loads(line) for line in moved.stdout.splitlines()]
    assert sorted(Path(d["path"]).name for g in groups for d in g["duplicates"]) == [
        "img0.jpg",
        "img1-copy.png",
        "img2.jpg",
    ]
    assert {Path(g["keep"]).parent for g in groups} == {folder}
    # Moved under the target with their paths relative to the library, and out of the index.
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*.*g")) == [
        "backup/deep/img2.jpg",
        "backup/img0.jpg",
        "backup/img1-copy.png",
    ]
    assert not (folder / "backup" / "img0.jpg").exists()
    assert "moved 3 files" in moved.stderr
    assert indexed_paths(index) == paths_before - {
        d["path"] for g in groups for d in g["duplicates"]
    }
    [manifest] = target.glob("simsearch-moves-*.jsonl")

    undone = run("dedup", "--undo", manifest, "--index", index)
    assert undone.exit_code == 0, undone.output
    assert "put back 3 files" in undone.stdout
    assert snapshot(folder) == before
    assert indexed_paths(index) == paths_before
    # The index knows them as they were: a new run finds nothing to embed.
    with Index.open(index) as idx:
        summary = idx.add(folder)
    assert (summary.indexed, summary.unchanged) == (0, len(before))
    # Undoing again changes nothing.
    again = run("dedup", "--undo", manifest, "--json")  # the manifest names its index
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["files"] == 0
    assert snapshot(folder) == before


def labels_and_clusters(index: Path) -> dict[str, tuple]:
    with Index.open(index) as idx:
        ids = {i: p for p, i in ((p, k.id) for p, k in idx.store.known_files().items())}
        labels = idx.store.labels_of(list(ids))
        clusters = idx.store.clusters_of(list(ids))
    return {p: (tuple(labels.get(i, ())), clusters.get(i)) for i, p in ids.items()}


def test_undo_gives_back_labels_and_clusters(tmp_path, library):
    from simsearch.records import Label

    _, index = library
    with Index.open(index) as idx:
        known = idx.store.known_files()
        labels = {k.id: [Label(f"name {k.id % 3}", 0.5 + k.id / 100)] for k in known.values()}
        idx.store.write_labels(labels, {"model": "a classifier", "top": 1})
        idx.cluster(3)
    before = labels_and_clusters(index)
    assert all(lab and cluster is not None for lab, cluster in before.values())
    with Index.open(index) as idx:
        report = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups")
        assert len(labels_and_clusters(index)) == len(before) - 3
        idx.undo_moves(report.manifest)
    assert labels_and_clusters(index) == before


def test_a_crash_mid_move_is_undone_completely(tmp_path, library, monkeypatch):
    folder, index = library
    before, paths_before = snapshot(folder), indexed_paths(index)
    import simsearch.ops.moves as moves

    real_move, calls = moves.move_entry, []

    def flaky_move(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed before the third file moved
        real_move(*args)

    monkeypatch.setattr(moves, "move_entry", flaky_move)
    with Index.open(index) as idx, pytest.raises(KeyboardInterrupt):
        idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups")
    monkeypatch.setattr(moves, "move_entry", real_move)
    [manifest] = (tmp_path / "dups").glob("*.jsonl")
    assert len(manifest.read_text().splitlines()) == 4  # header + three logged moves
    with Index.open(index) as idx:
        report = idx.undo_moves(manifest)
    assert report.files == 2 and report.skipped == []
    assert snapshot(folder) == before
    assert indexed_paths(index) == paths_before


def test_moves_across_file_systems_copy_then_delete(tmp_path, library, monkeypatch):
    folder, index = library
    before = snapshot(folder)
    real_rename = os.rename

    def rename(source, dest, **kwargs):
        if not os.path.basename(source).startswith(".simsearch-tmp-"):  # not our own copy
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(source, dest, **kwargs)

    monkeypatch.setattr("simsearch.fs.files.os.rename", rename)
    with Index.open(index) as idx:
        report = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups")
        assert report.files == 3
        assert not list((tmp_path / "dups").rglob(".simsearch-tmp-*"))
        idx.undo_moves(report.manifest)
    assert snapshot(folder) == before


def test_delete_needs_yes_and_keeps_the_kept_images(library):
    folder, index = library
    refused = run("dedup", "--index", index, "--threshold", "0.9999", "--delete")
    assert refused.exit_code == 2
    assert "add --yes" in refused.output
    assert (folder / "backup" / "img0.jpg").exists()
    done = run("dedup", "--index", index, "--threshold", "0.9999", "--delete", "--yes")
    assert done.exit_code == 0, done.output
    assert "deleted 3 files" in done.stderr
    assert not list((folder / "backup").rglob("*.*g"))
    assert all((folder / f"img{i}.{'png' if i % 2 else 'jpg'}").exists() for i in range(3))
    assert not any("backup" in p for p in indexed_paths(index))


def test_files_changed_since_indexing_are_left_alone(tmp_path, library):
    folder, index = library
    changed = folder / "backup" / "img0.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    kept_gone = folder / "img1.png"
    moved_away = tmp_path / "elsewhere.png"
    shutil.move(kept_gone, moved_away)
    with Index.open(index) as idx:
        report = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups")
    assert report.files == 1  # only backup/deep/img2.jpg
    reasons = dict(report.skipped)
    assert "changed or gone since it was indexed" in reasons[str(changed)]
    assert "the file to keep is gone" in reasons[str(folder / "backup" / "img1-copy.png")]
    assert changed.exists() and (folder / "backup" / "img1-copy.png").exists()


def test_bad_action_combinations_and_manifests_are_clear_errors(tmp_path, library):
    _, index = library
    both = run("dedup", "--index", index, "--threshold", "0.99", "--delete", "--move-to", "x")
    assert both.exit_code == 2 and "choose one of --move-to and --delete" in both.output
    bogus = tmp_path / "notes.jsonl"
    bogus.write_text('{"hello": 1}\n')
    result = run("dedup", "--undo", bogus)
    assert result.exit_code == 1
    assert "is not a manifest of moved duplicates" in result.output


def test_undo_forgets_the_moved_to_paths_an_index_run_found_inside_the_library(library):
    """A target inside the indexed folder: `index` finds the moved files there; after the
    undo they are back where they were, and no entry names the paths they no longer have."""
    folder, index = library
    before, paths_before = snapshot(folder), indexed_paths(index)
    target = folder / "dups"
    moved = run("dedup", "--index", index, "--threshold", "0.9999", "--move-to", target)
    assert moved.exit_code == 0, moved.output
    with Index.open(index) as idx:
        assert idx.add(folder).reused == 3  # the moved files, found again under dups/
    (manifest,) = target.glob("simsearch-moves-*.jsonl")
    undone = run("dedup", "--index", index, "--undo", manifest)
    assert undone.exit_code == 0, undone.output
    assert indexed_paths(index) == paths_before  # nothing under dups/ left in the index
    after = {k: v for k, v in snapshot(folder).items() if not k.startswith("dups")}
    assert after == before
