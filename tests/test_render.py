"""The CLI's text for the library's records (simsearch.cli.render), which people read and
paste from."""

from __future__ import annotations

import shlex

from simsearch.cli.render import add_line, move_line
from simsearch.records import AddSummary, MoveReport


def test_a_move_says_how_to_undo_it_quoted_for_a_shell():
    manifest = "/home/me/my duplicates/moves-2024.jsonl"
    report = MoveReport("move", 2, 3 * 2**20, [("/photos/a.jpg", "changed since")], manifest)
    line = move_line(report)
    assert line == (
        "moved 2 files (3.0 MB); left 1 alone; undo with: simsearch dedup --undo "
        "'/home/me/my duplicates/moves-2024.jsonl'"
    )
    # Pasted into a shell, the command names the manifest as one argument.
    assert shlex.split(line.split("undo with: ")[1]) == ["simsearch", "dedup", "--undo", manifest]


def test_only_a_move_offers_an_undo():
    assert (
        move_line(MoveReport("undo", 1, 2**20, [], "/m/moves.jsonl")) == "put back 1 files (1.0 MB)"
    )
    assert move_line(MoveReport("delete", 3, 0, [], None)) == "deleted 3 files (0.0 MB)"


def test_the_index_summary_counts_every_outcome():
    summary = AddSummary(5, 3, 1, 1, moved=2, removed=4, reused=1, seconds=1.3)
    assert add_line(summary) == (
        "5 files seen, 3 indexed (1 copied from identical files), 1 skipped as unchanged, "
        "1 failed, 2 moved, 4 removed (1.3 s)"
    )


def test_one_file_is_one_file_in_the_summary():
    assert add_line(AddSummary(1, 1, 0, 0)).startswith("1 file seen,")
    assert add_line(AddSummary(2, 2, 0, 0)).startswith("2 files seen,")
