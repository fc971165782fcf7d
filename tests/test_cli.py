"""The simsearch command end to end through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from conftest import draw_image

from simsearch import __version__


@pytest.fixture
def built(run, tmp_path, tiny_vit, photo_dir):
    index = tmp_path / "index"
    result = run("index", photo_dir, "--index", index, "--model", tiny_vit)
    assert result.exit_code == 0, result.output
    return index


def test_index_prints_one_summary_line(run, tmp_path, tiny_vit, photo_dir):
    (photo_dir / "broken.png").write_bytes(b"\x89PNG broken")
    result = run("index", photo_dir, "--index", tmp_path / "ix", "--model", tiny_vit)
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.stdout.startswith("9 files seen, 8 indexed, 0 skipped as unchanged, 1 failed")
    assert "skipping" in result.stderr and "broken.png" in result.stderr
    again = run("index", photo_dir, "--index", tmp_path / "ix", "--json")
    data = json.loads(again.stdout)
    # The broken file is tried again (it may have been fixed), and fails again.
    assert (data["seen"], data["indexed"], data["unchanged"], data["failed"]) == (9, 0, 8, 1)


def test_model_and_index_come_from_the_environment(run, tmp_path, tiny_vit, photo_dir):
    env = {"SIMSEARCH_INDEX": str(tmp_path / "envix"), "SIMSEARCH_MODEL": str(tiny_vit)}
    assert run("index", photo_dir, env=env).exit_code == 0
    info = json.loads(run("info", "--json", env=env).stdout)
    assert info["indexed"] == 8 and info["model"] == str(tiny_vit)


def test_search_json_lines_parse_back(run, built, photo_dir):
    query = photo_dir / "img1.png"
    result = run("search", query, "id:3", "--index", built, "-k", "3", "--json")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [str(query), "id:3"]
    first = lines[0]["hits"]
    assert len(first) == 3
    assert set(first[0]) == {"id", "path", "score"}
    assert first[0]["path"] == str(query)
    assert first[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in first] == sorted((h["score"] for h in first), reverse=True)
    assert lines[1]["hits"][0]["id"] == 3


def test_search_table_for_people(run, built, photo_dir):
    result = run("search", photo_dir / "img0.jpg", "--index", built, "-k", "2")
    lines = result.stdout.splitlines()
    assert lines[0] == f"query: {photo_dir / 'img0.jpg'}"
    assert lines[1].split() == ["rank", "score", "path"]
    assert lines[2].split() == ["1", "1.0000", str(photo_dir / "img0.jpg")]
    assert len(lines) == 4


def test_info_json_has_counts_and_settings(run, built):
    data = json.loads(run("info", "--index", built, "--json").stdout)
    assert data["indexed"] == 8 and data["failed"] == 0
    assert (data["dim"], data["layer"], data["pool"]) == (32, 3, "cls")
    assert data["size_bytes"] > 0


def test_layer_and_pool_are_recorded_and_enforced(run, tmp_path, tiny_vit, photo_dir):
    ix = tmp_path / "mean"
    result = run(
        "index", photo_dir, "--index", ix, "--model", tiny_vit, "--layer", "-2", "--pool", "mean"
    )
    assert result.exit_code == 0
    data = json.loads(run("info", "--index", ix, "--json").stdout)
    assert (data["layer"], data["pool"]) == (2, "mean")
    clash = run("index", photo_dir, "--index", ix, "--pool", "cls")
    assert clash.exit_code == 1
    assert clash.stderr.strip() == (
        "Error: this index was built with different settings; pool: index has 'mean', "
        "requested 'cls'. A different model, layer or pooling needs a new index; give a new "
        "folder as --index"
    )


def test_other_model_on_existing_index_is_refused(run, built, other_vit, photo_dir):
    result = run("index", photo_dir, "--index", built, "--model", other_vit)
    assert result.exit_code == 1
    assert "model: index was built with" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_info_errors_lists_failed_files(run, tmp_path, tiny_vit, photo_dir):
    (photo_dir / "zero.jpg").write_bytes(b"")
    ix = tmp_path / "ix"
    run("index", photo_dir, "--index", ix, "--model", tiny_vit)
    text = run("info", "--index", ix, "--errors").stdout
    assert f"failed:   {photo_dir / 'zero.jpg'}: empty file (0 bytes)" in text
    data = json.loads(run("info", "--index", ix, "--errors", "--json").stdout)
    assert data["errors"] == [
        {"path": str(photo_dir / "zero.jpg"), "error": "empty file (0 bytes)"}
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["search"], "Error: Missing argument 'QUERIES...'. (see 'cli search --help')"),
        (
            ["index", "/no/such/dir"],
            "Error: Invalid value for '[DIRS]...': Path '/no/such/dir' "
            "does not exist. (see 'cli index --help')",
        ),
        (
            ["search", "x.jpg", "-k", "0"],
            "Error: Invalid value for '-k': 0 is not in the range x>=1. (see 'cli search --help')",
        ),
        (
            ["index"],
            "Error: give the folders to index (DIRS), or --index-type, or --label-model "
            "(see 'cli index --help')",
        ),
        (["frobnicate"], "Error: No such command 'frobnicate'. (see 'cli --help')"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(run, args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert result.stdout == ""


def test_missing_index_is_a_one_line_error(run, tmp_path):
    result = run("search", "id:1", "--index", tmp_path / "none")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"Error: no index at {tmp_path / 'none'}")


def test_unreachable_hub_model_is_one_clear_line(run, tmp_path, photo_dir):
    result = run("index", photo_dir, "--index", tmp_path / "ix", "--model", "someone/uncached")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "Give a folder written by save_pretrained instead (--model or SIMSEARCH_MODEL)"
    )
    assert "Traceback" not in result.output


def test_help_teaches_with_examples_and_version(run):
    top = run("-h")
    assert top.exit_code == 0 and "simsearch index ~/Pictures" in top.stdout
    for command in ("index", "search", "info"):
        text = run(command, "--help").stdout
        assert "Examples:" in text and "--index" in text
    assert "SIMSEARCH_MODEL" in run("index", "--help").stdout
    assert run("--version").stdout.strip() == f"simsearch, version {__version__}"


def test_index_reports_time_per_stage_on_stderr(run, tmp_path, tiny_vit, photo_dir):
    result = run("index", photo_dir, "--index", tmp_path / "ix", "--model", tiny_vit, "--json")
    stages = json.loads(result.stdout)["stages"]
    assert set(stages) == {"listing", "decoding", "waiting", "model", "database", "faiss"}
    assert all(v >= 0 for v in stages.values()) and stages["model"] > 0
    assert stages["decoding"] > 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("time: listing ") and "model waited" in line
    quiet = run("index", photo_dir, "--index", tmp_path / "ix", "-q")
    assert quiet.stderr == ""


def test_a_moved_model_folder_is_explained(run, tmp_path, tiny_vit, photo_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_vit, model)
    ix = tmp_path / "ix"
    run("index", photo_dir, "--index", ix, "--model", model)
    model.rename(tmp_path / "model-moved")
    query = tmp_path / "new.png"
    from conftest import draw_image

    draw_image(90).save(query)
    lost = run("search", query, "--index", ix)
    assert lost.exit_code == 1
    assert lost.stderr.strip() == (
        f"Error: model folder not found: {model}. This index was built with that model; if it "
        "has moved, say where it is now (--model or SIMSEARCH_MODEL)"
    )
    found = run("search", query, "--index", ix, "--model", tmp_path / "model-moved", "--json")
    assert found.exit_code == 0 and json.loads(found.stdout)["hits"]


def test_a_folder_with_no_image_suffix_says_which_and_how_to_include_them(run, tmp_path, tiny_vit):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mov", "b.mov", "scan.xyz", "README"):
        (clips / name).write_bytes(b"x")
    result = run("index", clips, "--index", tmp_path / "ix", "--model", tiny_vit)
    assert result.exit_code == 0
    assert result.stdout.startswith("0 files seen")
    assert "every file was skipped for its extension: .mov (2), (no suffix) (1), .xyz (1)" in (
        result.stderr
    )
    assert "simsearch index FILE" in result.stderr
    data = json.loads(run("-q", "index", clips, "--index", tmp_path / "ix", "--json").stdout)
    assert data["skipped_suffixes"] == {".mov": 2, ".xyz": 1, "": 1}
    # A folder that has an image says nothing about the rest.
    draw_image(0).save(clips / "one.png")
    again = run("index", clips, "--index", tmp_path / "ix")
    assert "skipped for its extension" not in again.stderr


def test_the_skipped_notice_names_the_extra_for_heic_and_raw():
    from simsearch.cli.indexing import _skipped_line

    line = _skipped_line({".heic": 3, ".nef": 2})
    assert ".heic (3), .nef (2)" in line
    assert "pip install 'simsearch[heic]'" in line and "pip install 'simsearch[raw]'" in line
    assert "FILE" not in line  # nothing else to name


def test_the_onnx_only_install_lists_the_core_dependencies_but_torch():
    """The README's ONNX-only line must follow pyproject.toml: a dependency added to the
    core and not to that line would be missing from an ONNX-only install."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    repo = Path(__file__).resolve().parent.parent
    core = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {d for d in core if not re.match(r"(torch|transformers)\b", d)}
    wanted |= set(
        tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"][
            "onnx"
        ]
    )
    readme = (repo / "README.md").read_text()
    line = next(
        ln for ln in readme.split("ONNX-only install", 1)[1].splitlines() if "pip install" in ln
    )
    assert set(re.findall(r'"([^"]+)"', line.split("&&")[0])) == wanted
    assert line.strip().endswith("pip install --no-deps .")


def test_every_command_that_prints_rows_prints_them_as_csv_with_a_header(run, built, photo_dir):
    import csv
    import io

    def table(*args):
        result = run(*args, "--index", built, "--csv")
        assert result.exit_code == 0, result.output
        return list(csv.reader(io.StringIO(result.stdout)))

    rows = table("search", photo_dir / "img1.png", "id:3", "-k", "3")
    assert rows[0] == ["query", "rank", "id", "score", "path"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (q, str(rank)) for q in (str(photo_dir / "img1.png"), "id:3") for rank in (1, 2, 3)
    ]
    assert rows[1][4] == str(photo_dir / "img1.png") and float(rows[1][3]) == 1.0
    rows = table("cluster", "-k", "2", "--top", "2")
    assert rows[0] == ["cluster", "size", "cohesion", "rank", "id", "score", "path"]
    assert {r[0] for r in rows[1:]} == {"1", "2"} and all(r[6] for r in rows[1:])
    rows = table("dedup", "--threshold", "0.5")
    assert rows[0][:4] == ["group", "role", "path", "score"]
    (photo_dir / "broken.png").write_bytes(b"\x89PNG broken")
    assert run("index", photo_dir, "--index", built).exit_code == 0
    rows = table("info", "--errors")
    assert rows[0] == ["path", "error"]
    assert [r[0] for r in rows[1:]] == [str(photo_dir / "broken.png")] and rows[1][1]


@pytest.mark.parametrize(
    "command",
    [["search", "id:1"], ["dedup", "--threshold", "0.9"], ["cluster", "--show"], ["info"]],
)
def test_json_and_csv_together_is_a_usage_error(run, built, command):
    result = run(*command, "--index", built, "--json", "--csv")
    assert result.exit_code == 2
    assert "--json and --csv" in result.output


def test_info_csv_says_it_prints_the_errors_rows(run, built):
    result = run("info", "--index", built, "--csv")
    assert result.exit_code == 2 and "add --errors" in result.output
