"""File names that are not UTF-8: indexed, stored losslessly, shown escaped, and followed back
to the real file by search, export, dedup moves and their undo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import draw_image

from simsearch import Index
from simsearch.cli import cli
from simsearch.fs.names import shown

LATIN1 = b"caf\xe9.jpg"  # Latin-1 bytes, as old archives and Windows-1252 disks hold them
ESCAPED = "caf\\xe9.jpg"  # a valid UTF-8 name that spells the escape of the one above


@pytest.fixture
def folder(tmp_path) -> Path:
    """Photos with a Latin-1 name, the valid name spelling its escape, and a better copy of
    the Latin-1 one (larger, so dedup keeps it and moves the Latin-1 file)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_image(1).save(os.fsdecode(bytes(photos) + b"/" + LATIN1), quality=95)
    draw_image(2).save(photos / ESCAPED, quality=95)
    draw_image(1, size=(192, 144)).save(photos / "original.jpg", quality=95)
    for i in range(3, 6):
        draw_image(i).save(photos / f"other{i}.png")
    return photos


def latin1(folder: Path) -> str:
    """The Latin-1 file's path, as Python's os functions take it (surrogate-escaped str)."""
    return os.fsdecode(os.fsencode(folder) + b"/" + LATIN1)


def same_file(path: str, expected: str) -> bool:
    return os.path.samefile(path, expected) and os.fsencode(path) == os.fsencode(expected)


def test_both_names_are_indexed_as_distinct_rows_stored_losslessly(tmp_path, tiny_vit, folder):
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        summary = idx.add(folder)
        assert (summary.indexed, summary.failed) == (6, 0)
        known = idx.store.known_files()
        assert latin1(folder) in known and str(folder / ESCAPED) in known
        assert known[latin1(folder)].id != known[str(folder / ESCAPED)].id
        assert idx.add(folder).unchanged == 6  # the second run finds the same keys: no churn
    with sqlite3.connect(tmp_path / "index" / "meta.sqlite") as db:
        kinds = dict(db.execute("SELECT path, typeof(path) FROM images").fetchall())
    assert kinds[os.fsencode(latin1(folder))] == "blob"  # the real bytes, not an escape
    assert kinds[str(folder / ESCAPED)] == "text"


def test_search_by_the_file_finds_it_under_its_real_name(tmp_path, tiny_vit, folder):
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(folder)
        for path in (latin1(folder), str(folder / ESCAPED)):
            hit = idx.search(path, k=1)[0]
            assert same_file(hit.path, path) and hit.score > 0.999
            assert Path(hit.path).read_bytes() == Path(path).read_bytes()


def test_cli_shows_the_name_escaped_and_json_keeps_the_bytes(tmp_path, tiny_vit, folder):
    runner = CliRunner()
    index = tmp_path / "index"
    made = runner.invoke(cli, ["index", str(folder), "--index", str(index), "--model", tiny_vit])
    assert made.exit_code == 0, made.output
    assert "skipping" not in made.stderr
    (folder / "broken.png").write_bytes(b"not a png")
    os.rename(folder / "broken.png", os.fsdecode(os.fsencode(folder) + b"/bad\xff.png"))
    again = runner.invoke(cli, ["index", str(folder), "--index", str(index)])
    assert again.exit_code == 0, again.output
    assert "skipping " + shown(folder) + "/bad\\xff.png: not an image" in again.stderr
    table = runner.invoke(cli, ["search", latin1(folder), "--index", str(index), "-k", "1"])
    assert table.exit_code == 0, table.output
    assert shown(latin1(folder)) in table.stdout  # .../caf\xe9.jpg, no UnicodeEncodeError
    as_json = runner.invoke(cli, ["search", latin1(folder), "--index", str(index), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert "\\udce9" in as_json.stdout  # JSON's escape for the byte: ASCII, valid JSON
    hit = json.loads(as_json.stdout)["hits"][0]
    assert same_file(hit["path"], latin1(folder))  # json.loads gives the real path back


def test_export_gives_back_paths_that_name_the_real_files(tmp_path, tiny_vit, folder):
    pq = pytest.importorskip("pyarrow.parquet")
    real = {latin1(folder), str(folder / ESCAPED)}
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(folder)
        for fmt, out in (("npy", "v"), ("csv", "v.csv"), ("parquet", "v.parquet")):
            idx.export(tmp_path / out, fmt)
    # npy: one JSON string per line; json.loads gives the str that open() takes.
    lines = (tmp_path / "v" / "paths.txt").read_text(encoding="utf-8").splitlines()
    from_npy = {json.loads(line) for line in lines}
    # csv: the name's own bytes; read back with surrogateescape.
    with open(tmp_path / "v.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        from_csv = {row["path"] for row in csv.DictReader(f)}
    # parquet: path_bytes is the name's bytes; path is the escaped text people read.
    table = pq.read_table(tmp_path / "v.parquet")
    from_parquet = {os.fsdecode(b) for b in table.column("path_bytes").to_pylist()}
    assert shown(latin1(folder)) in table.column("path").to_pylist()
    for found in (from_npy, from_csv, from_parquet):
        assert real <= found and len(found) == 6
        assert all(os.path.isfile(p) for p in found)


def test_dedup_moves_the_real_file_and_undo_puts_it_back(tmp_path, tiny_vit, folder):
    before = sorted(os.listdir(os.fsencode(folder)))
    content = Path(latin1(folder)).read_bytes()
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(folder)
        groups = idx.duplicates(0.99)
        assert [(g.keep_path, [d.path for d in g.duplicates]) for g in groups] == [
            (str(folder / "original.jpg"), [latin1(folder)])
        ]
        report = idx.move_duplicates(groups, tmp_path / "dups")
        assert (report.files, report.skipped) == (1, [])
        assert LATIN1 not in os.listdir(os.fsencode(folder))
        moved = [p for p in Path(tmp_path / "dups").rglob("*") if p.name.endswith(".jpg")]
        assert [os.fsencode(p.name) for p in moved] == [LATIN1]
        assert moved[0].read_bytes() == content
        assert (folder / ESCAPED).is_file()  # the name that spells the escape is untouched
        undone = idx.undo_moves(report.manifest)
        assert (undone.files, undone.skipped) == (1, [])
        assert sorted(os.listdir(os.fsencode(folder))) == before
        assert Path(latin1(folder)).read_bytes() == content
        assert idx.store.lookup(latin1(folder)) is not None  # back in the index


def test_a_row_left_by_the_old_escaping_is_replaced_by_the_real_name(tmp_path, tiny_vit, folder):
    """Indexes made before kept such a file as an error row under its escaped name; the next
    run indexes the real name and drops that row."""
    shutil.move(folder / ESCAPED, tmp_path / "aside.jpg")  # only the Latin-1 file remains
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        from simsearch.storage.store import BadImage

        old = str(folder / ESCAPED)
        idx.store.write_batch([], np.empty((0, idx.manifest.dim)), [BadImage(old, 1, 1, "x")])
        summary = idx.add(folder)
        assert summary.removed == 1 and idx.store.lookup(old) is None
        assert idx.store.lookup(latin1(folder)) is not None and idx.failed() == []
