"""The library's errors speak plainly (no flags, no commands) and carry fields; the CLI adds
the flag and the command line from those fields."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import simsearch
from simsearch.cli.hints import explain, flag
from simsearch.errors import (
    FIXES,
    FinetuneError,
    IndexNotFoundError,
    QueryError,
    SimsearchError,
    StorageError,
)

PACKAGE = Path(simsearch.__file__).parent
CLI_TEXT = re.compile(r"(?<![\w-])--[a-z]|`simsearch |simsearch [a-z-]+ --|SIMSEARCH_[A-Z]")


def _texts(node: ast.AST):
    """The literal text of a raise's or a log call's arguments (f-string parts included)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def test_no_library_error_or_warning_names_a_flag_or_a_command():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            said = None
            if isinstance(node, ast.Raise) and node.exc is not None:
                said = node.exc
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"warning", "error", "info"}
            ):
                said = node
            if said is None:
                continue
            for text in _texts(said):
                if CLI_TEXT.search(text):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text!r}")
    assert found == []


def test_fields_survive_and_unknown_fixes_are_refused(tmp_path):
    exc = FinetuneError("x exists", param="output", path=tmp_path)
    assert (str(exc), exc.param, exc.path, exc.fix) == ("x exists", "output", str(tmp_path), None)
    assert SimsearchError("plain").param is None
    with pytest.raises(ValueError, match="unknown fix"):
        SimsearchError("x", fix="reboot")
    assert {"undo", "resume", "create-index"} <= set(FIXES)


def test_the_cli_turns_fields_into_flags_and_commands(tmp_path):
    assert flag("move_to") == "--move-to"
    assert flag("label_model", "index") == "--label-model or SIMSEARCH_LABEL_MODEL"
    assert flag("label_model", "label") == "--model or SIMSEARCH_LABEL_MODEL"
    assert explain(QueryError("t is a file, not a folder.", param="move_to")) == (
        "t is a file, not a folder (--move-to)"
    )
    manifest = tmp_path / "my moves" / "moves.jsonl"
    stopped = StorageError("disk full", path=manifest, fix="undo")
    assert explain(stopped) == f"disk full; undo with: simsearch dedup --undo '{manifest}'"
    missing = IndexNotFoundError(f"no index at {tmp_path}", path=tmp_path, fix="create-index")
    assert explain(missing).endswith(f"create one with `simsearch index DIR --index {tmp_path}`")


def test_a_library_error_reaches_the_terminal_with_its_flag(run, tmp_path, index_path):
    (tmp_path / "taken").mkdir()
    result = run("export", "--index", index_path, "--output", tmp_path / "taken")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {tmp_path / 'taken'} already exists; choose a new output or remove it (--output)"
    )
    missing = run("search", "id:1", "--index", tmp_path / "none")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        f"Error: no index at {tmp_path / 'none'}; create one with "
        f"`simsearch index DIR --index {tmp_path / 'none'}`"
    )
