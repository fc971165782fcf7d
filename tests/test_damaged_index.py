"""A damaged index costs one clear line, never a traceback, and `repair` mends what the
database still holds: each case edits one value of a real index the way a disk error, a
bad copy or a hand edit would, then runs every command on it."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from simsearch.cli import cli


def _sql(index: Path, statement: str) -> None:
    with sqlite3.connect(index / "meta.sqlite") as db:
        db.execute(statement)


def _manifest_row(index: Path, change) -> None:
    with sqlite3.connect(index / "meta.sqlite") as db:
        (text,) = db.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (change(text),))


def _dim(value):
    def change(text: str) -> str:
        return json.dumps({**json.loads(text), "dim": value})

    return change


CASES = {
    "manifest row not JSON": lambda i: _manifest_row(i, lambda t: "{not json"),
    "manifest row dim 0": lambda i: _manifest_row(i, _dim(0)),
    "manifest row dim a string": lambda i: _manifest_row(i, _dim("32")),
    "generation not a number": lambda i: _sql(
        i, "UPDATE meta SET value = 'abc' WHERE key = 'generation'"
    ),
    "faiss generation not a number": lambda i: _sql(
        i, "UPDATE meta SET value = 'abc' WHERE key = 'faiss_generation'"
    ),
    "faiss info not JSON": lambda i: _sql(
        i, "UPDATE meta SET value = '{' WHERE key = 'faiss_info'"
    ),
    "2-byte vector": lambda i: _sql(i, "UPDATE vectors SET vector = x'0102' WHERE image_id = 1"),
    "4-byte vector": lambda i: _sql(
        i, "UPDATE vectors SET vector = x'01020304' WHERE image_id = 1"
    ),
    "manifest.json not UTF-8": lambda i: (i / "manifest.json").write_bytes(b"\xff\xfe{"),
    "manifest.json not JSON": lambda i: (i / "manifest.json").write_text("{"),
}

COMMANDS = (
    ["search", "id:1", "-k", "2"],
    ["info"],
    ["dedup", "--threshold", "0.9"],
    ["verify"],
    ["index"],
)


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_says_one_line_and_repair_mends_it(case, index_path, photo_dir):
    """Before: tracebacks (JSONDecodeError, ValueError from int('abc'), numpy's 'buffer
    size must be a multiple of element size' from `verify` itself, a reshape error from
    `dedup`, UnicodeDecodeError from `repair`)."""
    CASES[case](index_path)
    runner = CliRunner()
    where = ["--index", str(index_path)]
    for command in COMMANDS:
        args = [*command, str(photo_dir)] if command == ["index"] else command
        result = runner.invoke(cli, [*args, *where])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            case,
            command,
            result.exception,
        )
        assert result.exit_code in (0, 1), (command, result.output)
        if result.exit_code == 1 and command != ["verify"]:
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("Error: ") and "repair" in last, (command, last)
    repaired = runner.invoke(cli, ["repair", *where])
    assert repaired.exit_code == 0, repaired.output
    for command in (["verify"], ["search", "id:2", "-k", "2"], ["index", str(photo_dir)]):
        result = runner.invoke(cli, [*command, *where])
        assert result.exit_code == 0, (command, result.output)
    assert runner.invoke(cli, ["verify", *where]).exit_code == 0


def test_a_vectors_file_claiming_more_than_it_holds_is_never_read(index_path):
    """A 498-byte vectors.faiss whose header claims 3e9 vector values made `search`
    allocate 12 GB before FAISS noticed the file was short."""
    import struct

    file = index_path / "vectors.faiss"
    data = bytearray(file.read_bytes())
    assert data[:4] == b"IxMp" and data[37:41] == b"IxFI"  # an id map over a flat index
    data[74:82] = struct.pack("<Q", 3_000_000_000)  # the inner index's count of floats
    file.write_bytes(bytes(data))
    runner = CliRunner()
    verify = runner.invoke(cli, ["verify", "--index", str(index_path)])
    assert verify.exit_code == 1 and "vectors.faiss" in verify.output
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    found = runner.invoke(cli, ["search", "id:1", "-k", "1", "--index", str(index_path)])
    assert found.exit_code == 0, found.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB
    assert runner.invoke(cli, ["verify", "--index", str(index_path)]).exit_code == 0


def test_a_vectors_file_from_another_index_is_not_searched(tmp_path, tiny_vit, photo_dir):
    """Same ids, other vectors (mean pooling): `search` used it until `verify` was run."""
    from simsearch import Index

    runner = CliRunner()
    for name, pool in (("mine", "cls"), ("other", "mean")):
        args = ["index", str(photo_dir), "--index", str(tmp_path / name), "--model", str(tiny_vit)]
        assert runner.invoke(cli, [*args, "--pool", pool]).exit_code == 0
    with Index.open(tmp_path / "mine") as index:
        truth = [(h.id, h.score) for h in index.search("id:1", k=3)]
    (tmp_path / "mine" / "vectors.faiss").write_bytes(
        (tmp_path / "other" / "vectors.faiss").read_bytes()
    )
    verify = runner.invoke(cli, ["verify", "--index", str(tmp_path / "mine")])
    assert verify.exit_code == 1 and "not the file this index saved" in verify.output
    with Index.open(tmp_path / "mine") as index:
        assert [(h.id, h.score) for h in index.search("id:1", k=3)] == truth


@pytest.fixture
def read_only_copy(index_path, tmp_path):
    """The index, intact, seen through a read-only bind mount (a mounted backup)."""
    import shutil
    import subprocess

    view = tmp_path / "read-only"
    view.mkdir()
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(index_path), str(view)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot bind-mount read-only here (needs root)")
    if os.access(view, os.W_OK):
        subprocess.run(["umount", str(view)])
        pytest.skip("this kernel's bind mount is not read-only")
    yield view
    subprocess.run(["umount", str(view)], check=True)
    shutil.rmtree(view, ignore_errors=True)


def test_an_index_on_read_only_storage_is_searched_and_not_called_damaged(
    read_only_copy, photo_dir
):
    """Every command said "meta.sqlite is damaged ... restore it from a backup" of an
    intact index on a read-only mount (SQLite could not make its WAL files there)."""
    runner = CliRunner()
    where = ["--index", str(read_only_copy)]
    for command in (
        ["search", "id:1", "-k", "2"],
        ["info"],
        ["verify"],
        ["dedup", "--threshold", "0.9"],
    ):
        result = runner.invoke(cli, [*command, *where])
        assert result.exit_code == 0, (command, result.output)
    never_calibrated = runner.invoke(cli, ["dedup", *where])
    assert never_calibrated.exit_code == 1 and "pass --threshold" in never_calibrated.stderr
    for command in (["index", str(photo_dir)], ["repair"]):
        result = runner.invoke(cli, [*command, *where])
        assert result.exit_code == 1, (command, result.output)
        last = result.stderr.strip().splitlines()[-1]
        assert "read-only storage: it can be searched, not changed" in last, last
        assert "damaged" not in last


@pytest.mark.e2e
def test_a_file_size_limit_is_not_called_damage(index_path):
    import resource
    import signal
    import subprocess
    import sys

    from conftest import subprocess_env

    def no_file_growth():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    for stale in index_path.glob("meta.sqlite-*"):
        stale.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "simsearch", "search", "id:1", "--index", str(index_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        preexec_fn=no_file_growth,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "limits file sizes" in last and "may be intact" in last and "damaged" not in last
    assert CliRunner().invoke(cli, ["verify", "--index", str(index_path)]).exit_code == 0
