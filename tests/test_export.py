"""Export: every format gives back exactly the stored ids, paths and vectors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from simsearch import Index
from simsearch.cli import cli
from simsearch.ops.export import ExportError


def stored(index: Index) -> tuple[np.ndarray, list[str], np.ndarray]:
    """What the index holds, in id order, read the ordinary way."""
    ids = np.sort([h.id for h in index.search("id:1", k=100)])
    paths = index.store.paths(ids)
    vectors = index.store.vectors_by_id(ids)
    return ids, [paths[i] for i in ids], np.stack([vectors[i] for i in ids])


def test_npy_round_trips_ids_paths_and_vectors(index_path, tmp_path):
    with Index.open(index_path) as index:
        assert index.export(tmp_path / "out", "npy") == len(index)
        ids, paths, vectors = stored(index)
    out = tmp_path / "out"
    assert np.array_equal(np.load(out / "ids.npy"), ids)
    assert np.array_equal(np.load(out / "vectors.npy", mmap_mode="r"), vectors)
    lines = (out / "paths.txt").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == paths
    assert not list(tmp_path.glob(".simsearch-tmp-*"))


def test_csv_round_trips(index_path, tmp_path):
    with Index.open(index_path) as index:
        index.export(tmp_path / "v.csv", "csv")
        ids, paths, vectors = stored(index)
    with open(tmp_path / "v.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == ids.tolist()
    assert [r["path"] for r in rows] == paths
    read = np.array([json.loads(r["vector"]) for r in rows], dtype=np.float32)
    np.testing.assert_allclose(read, vectors, atol=1e-6)


def test_parquet_round_trips(index_path, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with Index.open(index_path) as index:
        index.export(tmp_path / "v.parquet", "parquet")
        ids, paths, vectors = stored(index)
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column("id").to_pylist() == ids.tolist()
    assert table.column("path").to_pylist() == paths
    read = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert np.array_equal(read, vectors)


def test_export_never_overwrites_and_names_the_problem(index_path, tmp_path):
    (tmp_path / "taken.csv").write_text("mine", encoding="utf-8")
    with Index.open(index_path) as index:
        with pytest.raises(ExportError, match="already exists"):
            index.export(tmp_path / "taken.csv", "csv")
        with pytest.raises(ExportError, match="unknown export format"):
            index.export(tmp_path / "x", "xlsx")
        with pytest.raises(ExportError, match="is not a folder"):
            index.export(tmp_path / "no" / "such" / "x.csv", "csv")
    assert (tmp_path / "taken.csv").read_text(encoding="utf-8") == "mine"


def test_cli_export_json(index_path, tmp_path):
    result = CliRunner().invoke(
        cli, ["export", "--index", str(index_path), "-o", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"count": 8, "format": "npy", "output": str(tmp_path / "o")}
    result = CliRunner().invoke(
        cli, ["export", "--index", str(index_path), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "already exists" in result.output


def test_export_never_touches_a_users_folder_beside_it(index_path, tmp_path):
    """The npy export writes into a folder of its own making (a unique name), not X.tmp."""
    mine = tmp_path / "out.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine", encoding="utf-8")
    with Index.open(index_path) as index:
        index.export(tmp_path / "out", "npy")
    assert (mine / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == [
        "out",
        "out.tmp",
    ]


def test_an_existing_output_of_any_kind_is_an_error(index_path, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with Index.open(index_path) as index:
        for name, fmt in [("empty", "npy"), ("link", "npy"), ("link", "csv")]:
            with pytest.raises(ExportError, match="already exists"):
                index.export(tmp_path / name, fmt)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_users_tmp_file_in_the_index_folder_survives_writes(index_path, photo_dir):
    """Crash leftovers are removed by the exact names simsearch makes, nothing else."""
    mine = index_path / "notes.tmp"
    mine.write_text("mine", encoding="utf-8")
    (index_path / "meta.sqlite.abc.tmp").write_text("also mine", encoding="utf-8")
    leftover = index_path / ".simsearch-tmp-vectors.faiss.ab12cd_3.tmp"
    leftover.write_bytes(b"half a file")
    with Index.open(index_path) as index:
        (photo_dir / "img0.jpg").unlink()
        index.add(photo_dir)
    assert mine.read_text(encoding="utf-8") == "mine"
    assert (index_path / "meta.sqlite.abc.tmp").read_text(encoding="utf-8") == "also mine"
    assert not leftover.exists()
