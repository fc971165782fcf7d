"""`verify` finds every broken invariant; `repair` rebuilds what the database can rebuild."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from simsearch import Index
from simsearch.cli import cli
from simsearch.errors import IndexFormatError
from simsearch.search.vectors import VectorIndex


def _sql(index_path, statement, *args):
    with sqlite3.connect(index_path / "meta.sqlite") as db:
        db.execute(statement, args)


def _verify(index_path):
    with Index.open(index_path) as idx:
        return idx.verify()


def _repair(index_path):
    with Index.open(index_path) as idx:
        return idx.repair()


def test_a_fresh_index_verifies(index_path):
    assert _verify(index_path) == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: (p / "vectors.faiss").unlink(), "vectors.faiss is missing"),
        (lambda p: (p / "vectors.faiss").write_bytes(b"junk"), "vectors.faiss is unreadable"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
        (
            lambda p: (p / "manifest.json").write_text('{"format_version": 1, "dim": 7}'),
            "manifest.json is unreadable",
        ),
        (
            lambda p: _sql(p, "UPDATE meta SET value = '99' WHERE key = 'generation'"),
            "vectors.faiss is stale",
        ),
        (
            lambda p: _sql(p, "DELETE FROM vectors WHERE image_id = 3"),
            "1 images marked indexed have no vector",
        ),
        (
            lambda p: _sql(p, "UPDATE vectors SET vector = x'00112233' WHERE image_id = 2"),
            "1 vectors are damaged",
        ),
        (
            lambda p: _sql(
                p,
                "UPDATE vectors SET vector = ? WHERE image_id = 4",
                np.full(32, np.nan, dtype="<f4").tobytes(),
            ),
            "1 vectors are damaged",
        ),
        (
            lambda p: _sql(p, "UPDATE images SET status = 'error' WHERE id = 5"),
            "1 vectors belong to no indexed image",
        ),
    ],
    ids=[
        "faiss-missing",
        "faiss-junk",
        "manifest-missing",
        "manifest-other",
        "stale",
        "vector-missing",
        "vector-short",
        "vector-nan",
        "stray-vector",
    ],
)
def test_damage_is_found_and_repaired(index_path, damage, problem):
    damage(index_path)
    problems = _verify(index_path)
    assert any(problem in p for p in problems), problems
    assert _repair(index_path)
    assert _verify(index_path) == []


def test_faiss_vectors_that_differ_from_the_database_are_found(index_path):
    with Index.open(index_path) as idx:
        ids = idx.store.vector_ids()
        vecs = np.stack([idx.store.vector(int(i)) for i in ids])
    vecs[0] = -vecs[0]  # same ids, one wrong vector
    wrong = VectorIndex(32)
    wrong.add(ids, vecs)
    wrong.save(index_path / "vectors.faiss")
    assert "1 vectors in vectors.faiss differ from the database's" in _verify(index_path)
    _repair(index_path)
    assert _verify(index_path) == []


def test_repaired_vectors_are_embedded_again_by_the_next_run(index_path, photo_dir):
    _sql(index_path, "UPDATE vectors SET vector = x'00' WHERE image_id = 2")
    actions = _repair(index_path)
    assert any("marked 1 images" in a for a in actions)
    with Index.open(index_path) as idx:
        assert len(idx) == 7
        summary = idx.add(photo_dir)
        assert (summary.indexed, summary.unchanged) == (1, 7)
        assert len(idx) == 8 and idx.verify() == []


def test_a_corrupt_database_is_reported_not_repaired(index_path):
    with open(index_path / "meta.sqlite", "r+b") as fh:
        fh.seek(4096)  # the second page: a b-tree page of the schema's tables
        fh.write(b"\x13" * 4096)
    runner = CliRunner()
    for command in ("verify", "repair", "info"):
        result = runner.invoke(cli, [command, "--index", str(index_path)])
        assert result.exit_code == 1, result.output
        assert "damaged" in result.output and "Traceback" not in result.output
        assert "restore it from a backup" in result.output
        assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(IndexFormatError, match="is damaged"), Index.open(index_path) as idx:
        idx.repair()


def test_cli_verify_and_repair(index_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", "--index", str(index_path)])
    assert ok.exit_code == 0 and ok.stdout.startswith("ok: 8 indexed images, 0 failed files")
    (index_path / "vectors.faiss").unlink()
    bad = runner.invoke(cli, ["verify", "--index", str(index_path), "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout) == {"ok": False, "problems": ["vectors.faiss is missing"]}
    fixed = runner.invoke(cli, ["repair", "--index", str(index_path)])
    assert fixed.exit_code == 0
    assert fixed.stdout == "rebuilt vectors.faiss from the database (8 vectors)\n"
    again = runner.invoke(cli, ["repair", "--index", str(index_path)])
    assert again.stdout == "nothing to repair\n"


def test_cli_strict_and_lock_errors(index_path, photo_dir, monkeypatch):
    from simsearch.fs.lock import WriteLock

    monkeypatch.setattr("simsearch.config.LOCK_WAIT_SECONDS", 0.2)
    runner = CliRunner()
    (photo_dir / "bad.png").write_bytes(b"nope")
    strict = runner.invoke(cli, ["index", str(photo_dir), "--index", str(index_path), "--strict"])
    assert strict.exit_code == 3
    assert strict.stderr.strip().splitlines()[-1] == (
        "Error: 1 files failed (--strict); see `simsearch info --errors`"
    )
    relaxed = runner.invoke(cli, ["index", str(photo_dir), "--index", str(index_path)])
    assert relaxed.exit_code == 0
    with WriteLock(index_path):
        locked = runner.invoke(cli, ["index", str(photo_dir), "--index", str(index_path)])
    assert locked.exit_code == 1
    assert locked.stderr.strip().startswith(f"Error: index {index_path} is locked by pid ")
