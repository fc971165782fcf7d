# ruff: noqa: F811 (the `library` fixture, imported from test_moves, is an argument)
"""A manifest is data, not orders: `dedup --undo` validates the whole manifest before it
moves anything, refuses an edited one with one line naming the first bad entry, tolerates a
torn last line, never follows a symlink swapped into a path, and an interrupted undo or a
full disk during --move-to loses nothing."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_moves import indexed_paths, library, run, snapshot  # noqa: F401 (a fixture)

from simsearch import Index
from simsearch.errors import QueryError


@pytest.fixture
def moved(tmp_path, library):
    """The library with its three duplicates moved to dups/; returns (folder, index,
    manifest, the folder's files before, the index's paths before)."""
    folder, index = library
    before, paths_before = snapshot(folder), indexed_paths(index)
    with Index.open(index) as idx:
        report = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups")
    assert report.files == 3
    return folder, index, Path(report.manifest), before, paths_before


def lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def rewrite(manifest: Path, records: list) -> None:
    manifest.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    )


def vector(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def refused(manifest: Path, index: Path, expect: str) -> str:
    dups = snapshot(manifest.parent)
    result = run("dedup", "--undo", manifest, "--index", index)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ") and expect in line, line
    assert snapshot(manifest.parent) == dups  # nothing moved
    return line


def edits(folder: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    yield "from outside the root", 2, {"from": str(outside / "x.jpg")}
    yield "to outside the target", 2, {"to": str(tmp_path / "victim.txt")}
    yield "dotdot", 3, {"from": str(folder / "backup" / ".." / ".." / "evil.jpg")}
    yield "relative", 2, {"from": "backup/img0.jpg"}
    yield "nan", 3, {"vector": vector([np.nan] * 32)}
    yield "wrong dim", 4, {"vector": vector([1.0] + [0.0] * 15)}
    yield "not unit", 2, {"vector": vector([3.0] + [0.0] * 31)}
    yield "size type", 3, {"size": "12"}
    yield "negative size", 2, {"size": -1}
    yield "missing", 4, {"sha256": None}
    yield "labels type", 2, {"labels": {"source": "x", "labels": [[1, "a"]]}}


@pytest.mark.parametrize("case", [e[0] for e in edits(Path("/"), Path("/"))])
def test_an_edited_entry_is_refused_before_anything_moves(tmp_path, moved, case):
    folder, index, manifest, _, _ = moved
    _, line_no, change = next(e for e in edits(folder, tmp_path) if e[0] == case)
    (tmp_path / "victim.txt").write_text("mine")
    records = lines(manifest)
    entry = records[line_no - 1]
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    rewrite(manifest, records)
    message = refused(manifest, index, f"line {line_no}")
    assert str(manifest) in message
    assert (tmp_path / "victim.txt").read_text() == "mine"
    assert not (tmp_path / "outside").exists() and not (tmp_path / "evil.jpg").exists()


def test_a_header_root_edited_to_slash_is_refused(tmp_path, moved):
    folder, index, manifest, _, _ = moved
    records = lines(manifest)
    records[0]["root"] = "/"
    # ... with every entry made consistent with it, and a planted file to "put back".
    for r in records[1:]:
        r["to"] = str(manifest.parent / r["from"].lstrip("/"))
    planted = manifest.parent / str(folder / "planted.jpg").lstrip("/")
    planted.parent.mkdir(parents=True)
    shutil.copyfile(manifest.parent / "backup" / "img0.jpg", planted)
    records[1]["from"] = str(folder / "planted.jpg")
    records[1]["to"] = str(planted)
    rewrite(manifest, records)
    refused(manifest, index, "root")
    assert not (folder / "planted.jpg").exists()


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"from": 1}'])
def test_a_malformed_line_before_the_last_is_refused_with_its_number(moved, bad):
    _, index, manifest, _, _ = moved
    records = lines(manifest)
    records.insert(2, bad)
    rewrite(manifest, records)
    refused(manifest, index, "line 3")


def test_a_huge_manifest_line_is_refused_in_bounded_memory(moved):
    _, index, manifest, _, _ = moved
    records = lines(manifest)
    records[1]["keep"] = "x" * 40_000_000
    rewrite(manifest, records)
    tracemalloc.start()
    try:
        with Index.open(index) as idx, pytest.raises(QueryError, match="line 2"):
            idx.undo_moves(manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_a_torn_last_line_is_tolerated(moved):
    folder, index, manifest, before, paths_before = moved
    text = manifest.read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    # The last move was logged only half (a crash or a full disk): so it never happened.
    entry = json.loads(text[last:])
    shutil.move(entry["to"], entry["from"])
    manifest.write_text(text[: last + len(text[last:]) // 2])
    result = run("dedup", "--undo", manifest, "--index", index)
    assert result.exit_code == 0, result.output
    assert "put back 2 files" in result.stdout
    assert snapshot(folder) == before
    # The third file came back by hand, unindexed; the next index run embeds just it.
    assert indexed_paths(index) == paths_before - {entry["from"]}
    again = run("dedup", "--undo", manifest, "--index", index)
    assert again.exit_code == 0, again.output


def test_a_symlink_swapped_into_the_original_folder_is_not_followed(tmp_path, moved):
    folder, index, manifest, _, _ = moved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(folder / "backup")
    (folder / "backup").symlink_to(elsewhere)
    with Index.open(index) as idx:
        report = idx.undo_moves(manifest)
    assert report.files == 0
    assert all("symbolic link" in why for _, why in report.skipped), report.skipped
    assert list(elsewhere.iterdir()) == []
    assert len(list(manifest.parent.rglob("*.*g"))) == 3


def test_a_symlink_swapped_in_for_a_moved_file_is_not_put_back(tmp_path, moved):
    folder, index, manifest, _, _ = moved
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not yours")
    moved_file = manifest.parent / "backup" / "img0.jpg"
    moved_file.unlink()
    moved_file.symlink_to(secret)
    with Index.open(index) as idx:
        report = idx.undo_moves(manifest)
    assert report.files == 2
    assert not (folder / "backup" / "img0.jpg").exists()
    assert moved_file.is_symlink() and secret.read_bytes() == b"not yours"


class FullDisk:
    """open() for the manifest whose writes fail with ENOSPC, half written, past a size."""

    def __init__(self, limit: int):
        self.limit, self.real = limit, open

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real(file, mode, *args, **kwargs)
        return _Limited(f, self.limit) if str(file).endswith(".jsonl") and "r" not in mode else f


class _Limited:
    def __init__(self, f, limit):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data):
        if self.written + len(data) > self.limit:
            part = data[: len(data) // 2]
            self.f.write(part)
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_target_disk_stops_move_cleanly_and_undo_accepts_the_manifest(
    tmp_path,
    library,
    monkeypatch,
):
    folder, index = library
    before, paths_before = snapshot(folder), indexed_paths(index)
    sizes = []

    def measure():
        with Index.open(index) as idx:
            report = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "probe")
            sizes.extend(len(x) + 1 for x in Path(report.manifest).read_text().splitlines())
            idx.undo_moves(report.manifest)

    measure()
    header_and_two = sum(sizes[:3]) + sizes[3] // 3  # the third entry does not fit
    monkeypatch.setattr("builtins.open", FullDisk(header_and_two))
    target = tmp_path / "dups"
    result = run("dedup", "--index", index, "--threshold", "0.9999", "--move-to", target)
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: ") and "No space left" in message, message
    assert "moved 2 files" in message and "--undo" in message
    assert len(list(target.rglob("*.*g"))) == 2
    [manifest] = target.glob("*.jsonl")
    undone = run("dedup", "--undo", manifest, "--index", index)
    assert undone.exit_code == 0, undone.output
    assert "put back 2 files" in undone.stdout
    assert snapshot(folder) == before
    assert indexed_paths(index) == paths_before


def labels_and_clusters(index: Path) -> dict[str, tuple]:
    with Index.open(index) as idx:
        known = idx.store.known_files()
        ids = [k.id for k in known.values()]
        labels, clusters = idx.store.labels_of(ids), idx.store.clusters_of(ids)
        vectors = idx.store.vectors_by_id(ids)
        return {
            p: (tuple(labels.get(k.id, ())), clusters.get(k.id), vectors[k.id].tobytes())
            for p, k in known.items()
        }


def test_an_interrupted_undo_run_again_restores_every_file_and_its_index_entry(
    tmp_path,
    library,
    monkeypatch,
):
    from simsearch.records import Label

    folder, index = library
    with Index.open(index) as idx:
        known = idx.store.known_files()
        labels = {k.id: [Label(f"name {k.id % 3}", 0.5)] for k in known.values()}
        idx.store.write_labels(labels, {"model": "a classifier", "top": 1})
        idx.cluster(3)
    before, entries = snapshot(folder), labels_and_clusters(index)
    with Index.open(index) as idx:
        manifest = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups").manifest
    real_rename, calls = os.rename, []

    def killed_on_the_third(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "rename", killed_on_the_third)
    with Index.open(index) as idx, pytest.raises(KeyboardInterrupt):
        idx.undo_moves(manifest)
    monkeypatch.undo()
    result = run("dedup", "--undo", manifest, "--index", index)
    assert result.exit_code == 0, result.output
    assert snapshot(folder) == before
    assert labels_and_clusters(index) == entries
    assert indexed_paths(index) == set(entries)


@pytest.mark.e2e
def test_an_undo_killed_with_sigkill_then_run_again_loses_nothing(tmp_path, library):
    """A real kill (SIGKILL from the crash point after the second file is back, before the
    index knows it), then a second run: every file back, indexed, and `verify` passes."""
    import subprocess
    import sys

    from conftest import run_simsearch, subprocess_env

    from simsearch.records import Label

    folder, index = library
    with Index.open(index) as idx:
        known = idx.store.known_files()
        idx.store.write_labels(
            {k.id: [Label("a label", 0.5)] for k in known.values()}, {"model": "m", "top": 1}
        )
        idx.cluster(2)
    before, entries = snapshot(folder), labels_and_clusters(index)
    with Index.open(index) as idx:
        manifest = idx.move_duplicates(idx.duplicates(0.9999), tmp_path / "dups").manifest
    command = [sys.executable, "-m", "simsearch", "dedup", "--undo", manifest, "--index", index]
    killed = subprocess.run(
        [str(c) for c in command],
        env=subprocess_env(SIMSEARCH_CRASH_AT="undo-moved:2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert len(list((tmp_path / "dups").rglob("*.*g"))) == 1
    again = subprocess.run(
        [str(c) for c in command], env=subprocess_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert snapshot(folder) == before
    assert labels_and_clusters(index) == entries
    verify = run_simsearch("verify", "--index", index)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_fifo_named_as_the_manifest_is_refused_without_blocking(tmp_path, library):
    _, index = library
    fifo = tmp_path / "moves.jsonl"
    os.mkfifo(fifo)
    with Index.open(index) as idx, pytest.raises(QueryError, match="not a file"):
        idx.undo_moves(fifo)


def test_undo_remakes_folders_the_user_removed_and_refuses_a_link_in_the_target(tmp_path, moved):
    folder, index, manifest, before, _ = moved
    shutil.rmtree(folder / "backup")  # emptied by the move, then removed by the user
    elsewhere = tmp_path / "elsewhere"
    shutil.move(manifest.parent / "backup" / "deep", elsewhere)
    (manifest.parent / "backup" / "deep").symlink_to(elsewhere)  # swapped in after the move
    with Index.open(index) as idx:
        report = idx.undo_moves(manifest)
    assert report.files == 2
    [(path, why)] = report.skipped
    assert path.endswith("img2.jpg") and "symbolic link" in why
    assert (elsewhere / "img2.jpg").exists() and not (folder / "backup" / "deep").exists()
    after = snapshot(folder)
    assert {k: v for k, v in before.items() if "deep" not in k} == after


def test_a_symlink_planted_in_the_target_is_not_moved_through(tmp_path, library):
    folder, index = library
    target, elsewhere = tmp_path / "dups", tmp_path / "elsewhere"
    elsewhere.mkdir()
    target.mkdir()
    (target / "backup").symlink_to(elsewhere)
    with Index.open(index) as idx:
        report = idx.move_duplicates(idx.duplicates(0.9999), target)
        assert report.files == 0 and len(report.skipped) == 3
        assert list(elsewhere.iterdir()) == []
        undone = idx.undo_moves(report.manifest)  # the logged, never made moves
    assert undone.files == 0 and undone.skipped == []
    assert len(list((folder / "backup").rglob("*.*g"))) == 3
    indexed_paths(index)
