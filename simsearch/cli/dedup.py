"""`simsearch dedup`: near-duplicate groups, the threshold calibration, and moving or
deleting duplicates (and putting them back)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click
from click.core import ParameterSource

from simsearch.cli.common import (
    _report_written,
    check_output,
    cli,
    csv_option,
    csv_rows,
    html_option,
    index_option,
    json_option,
)
from simsearch.cli.render import calibration_line, move_line
from simsearch.config import (
    CALIBRATION_METHOD,
    CALIBRATION_SAMPLE,
    DEDUP_NEIGHBOURS,
)
from simsearch.records import facts_text

log = logging.getLogger("simsearch")


@cli.command()
@index_option
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Cosine similarity at which two images count as duplicates.  [default: the "
    "index's calibrated threshold; the first dedup calibrates it, once]",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Calibrate the threshold again (edited copies of a sample of the indexed images "
    "against their nearest other images), keep it, print it with the precision and recall "
    "it expects, and stop.",
)
@click.option(
    "--calibration-sample",
    type=click.IntRange(min=1),
    default=CALIBRATION_SAMPLE,
    show_default=True,
    help="Indexed images edited (7 copies each) when calibrating.",
)
@click.option(
    "--neighbours",
    type=click.IntRange(min=1),
    default=DEDUP_NEIGHBOURS,
    show_default=True,
    help="Nearest neighbours examined per image; groups larger than this are still found "
    "whole when their members chain together.",
)
@click.option(
    "--model",
    envvar="SIMSEARCH_MODEL",
    show_envvar=True,
    help="Where the index's model is now, if its folder moved (calibration embeds images).",
)
@click.option(
    "--move-to",
    type=click.Path(file_okay=False, path_type=Path),
    help="Move the duplicates (never the kept images) under this folder, keeping their "
    "relative paths, and remove them from the index; a manifest there makes it undoable.",
)
@click.option(
    "--undo",
    "undo_manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Put back the files moved by an earlier --move-to (its manifest) and return them "
    "to the index.",
)
@click.option(
    "--delete",
    is_flag=True,
    help="Delete the duplicates (never the kept images) for good; needs --yes.",
)
@click.option("--yes", is_flag=True, help="Confirm --delete.")
@csv_option
@json_option
@html_option
@click.pass_context
def dedup(
    ctx,
    index_path,
    threshold,
    calibrate,
    calibration_sample,
    neighbours,
    model,
    move_to,
    undo_manifest,
    delete,
    yes,
    as_csv,
    as_json,
    html_path,
):
    """Find groups of near-duplicate images and the one to keep in each; report them, or
    move or delete the others.

    Each image's nearest neighbours (batched FAISS searches, never an all-pairs matrix)
    above the threshold are joined into groups; byte-identical files are always one group.
    The image to keep is a real file (not a symbolic link) with the highest true
    resolution (read from the file's
    header), then lossless over lossy encoding (PNG, TIFF, lossless WebP over JPEG), then
    the largest file, then the oldest, then the shortest path; the others are listed with
    their similarity to it and the rule that decided.

    The right threshold depends on the model, so it is calibrated per index: a sample of
    the indexed images is edited the way copies are made (crop, rescale, JPEG re-encode,
    brightness, mirror, small rotation, border) and embedded, and the threshold that best
    separates those copies from each image's nearest other images is kept in the index's
    manifest, with the precision and recall it had (`simsearch info` shows them). This
    needs the model and the indexed files, once; --threshold overrides it.

    Nothing changes unless asked: --move-to DIR moves the duplicates aside (undo with
    --undo DIR/simsearch-moves-*.jsonl), --delete --yes deletes them; either way they leave
    the index. Files changed since indexing, or whose kept image is gone, are left alone.

    \b
    Examples:
      simsearch dedup                              # calibrated threshold
      simsearch dedup --calibrate                  # calibrate again, show the figures
      simsearch dedup --threshold 0.9 --json | jq -r '.duplicates[].path'
      simsearch dedup --csv > duplicates.csv
      simsearch dedup --html duplicates.html       # look before acting
      simsearch dedup --move-to ~/duplicates       # reversible
      simsearch dedup --undo ~/duplicates/simsearch-moves-20261124-101500.jsonl
      simsearch dedup --delete --yes

    --json prints one group per line, with the facts the keep rule compared (the true
    pixel size from the file's header, format, lossless or not, bytes, modification time)
    and, for each duplicate, the first rule by which the kept image won:
    {"keep": "/photos/a.jpg", "width": 4000, "height": 3000, "format": "JPEG",
    "lossless": false, "size": 3100000, "mtime_ns": ..., "duplicates": [{"path":
    "/photos/a-small.jpg", "score": 0.97, "width": 1280, ..., "why": "higher resolution"}]}
    Paths that name the same file as a member (symlinks, hard links) are listed under
    "aliases": the same file, never a duplicate, never moved or deleted.
    """
    from tqdm import tqdm

    from simsearch.api import Index

    obj = ctx.obj
    check_output(as_json, as_csv)
    if undo_manifest is not None:
        if move_to or delete or calibrate:
            raise click.UsageError(
                "--undo cannot be combined with --move-to, --delete or --calibrate"
            )
        _undo_moves(ctx, undo_manifest, index_path, as_json)
        return
    if move_to and delete:
        raise click.UsageError("choose one of --move-to and --delete")
    if delete and not yes:
        raise click.UsageError(
            "--delete removes the duplicates for good: add --yes (or use "
            "--move-to DIR, which can be undone)"
        )
    no_bar = True if obj["quiet"] else None
    with Index.open(index_path, model=model) as idx:
        if calibrate or (threshold is None and idx.manifest.dedup_calibration is None):
            with tqdm(desc="calibrating", unit="img", file=sys.stderr, disable=no_bar) as bar:
                found = idx.calibrate_dedup(
                    sample=calibration_sample, neighbours=neighbours, progress=bar
                )
            if calibrate:
                click.echo(json.dumps(asdict(found)) if as_json else calibration_line(found))
                return
            if not obj["quiet"]:
                click.echo(calibration_line(found), err=True)
        if threshold is None:
            stored = idx.dedup_calibration()  # warns when an older method made it
            if stored.method < CALIBRATION_METHOD and not obj["quiet"]:
                click.echo("run `simsearch dedup --calibrate` to calibrate it again", err=True)
            threshold = stored.threshold
        with tqdm(desc="comparing", unit="img", file=sys.stderr, disable=no_bar) as bar:
            groups = idx.duplicates(threshold, neighbours=neighbours, progress=bar)
        _print_groups(groups, threshold, as_csv, as_json)
        if html_path is not None:  # before any move: the page shows the files in place
            from simsearch.ops.report import dedup_page

            shown = dedup_page(
                groups, html_path, threshold=threshold, complete="simsearch dedup --json"
            )
            _report_written(obj, html_path, shown)
        done = None
        if move_to is not None:
            done = idx.move_duplicates(groups, move_to)
        elif delete:
            done = idx.delete_duplicates(groups)
    if done is not None:
        for path, reason in done.skipped:
            click.echo(f"left alone: {path}: {reason}", err=True)
        click.echo(move_line(done), err=True)


def _undo_moves(ctx, manifest: Path, index_path: Path, as_json: bool) -> None:
    from simsearch.api import Index
    from simsearch.ops.movelog import read_header

    header = read_header(manifest)
    if ctx.get_parameter_source("index_path") in (ParameterSource.DEFAULT, None):
        index_path = Path(header["index"])  # the manifest names its index
    with Index.open(index_path) as idx:
        report = idx.undo_moves(manifest)
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    for path, reason in report.skipped:
        click.echo(f"left alone: {path}: {reason}")
    click.echo(move_line(report))


def _print_groups(groups, threshold: float, as_csv: bool, as_json: bool) -> None:
    """Print the groups with the facts the keep rule compared, and why each duplicate lost."""
    if as_csv:
        csv_rows(["group", "role", "path", "score", *FACT_COLUMNS, "why"], _csv_cells(groups))
        return
    for group in groups:
        if as_json:
            dups = [
                {"path": d.path, "score": d.score, **_fact_dict(d.facts), "why": d.why}
                for d in group.duplicates
            ]
            record = {"keep": group.keep_path, **_fact_dict(group.keep_facts), "duplicates": dups}
            if group.aliases:
                record["aliases"] = list(group.aliases)
            click.echo(json.dumps(record))
            continue
        click.echo(f"keep       {group.keep_path}{_facts_text(group.keep_facts)}")
        for dup in group.duplicates:
            why = f"; kept: {dup.why}" if dup.why else ""
            click.echo(f"  {dup.score:6.4f}  {dup.path}{_facts_text(dup.facts, why)}")
        for alias in group.aliases:
            click.echo(f"  same file {alias} (another name for a file above: left alone)")
    if not as_json:
        count = sum(len(g.duplicates) for g in groups)
        click.echo(f"{len(groups)} groups, {count} duplicates (threshold {threshold})")


def _csv_cells(groups):
    for n, group in enumerate(groups, 1):
        yield [n, "keep", group.keep_path, "", *_fact_cells(group.keep_facts), ""]
        for dup in group.duplicates:
            yield [n, "duplicate", dup.path, f"{dup.score:.4f}", *_fact_cells(dup.facts), dup.why]
        for alias in group.aliases:
            yield [n, "alias", alias, "", *_fact_cells(None), "same file"]


# The keep rule's facts, as --csv columns and --json fields.
FACT_COLUMNS = ("width", "height", "format", "lossless", "size", "mtime_ns")


def _fact_dict(facts) -> dict:
    return {} if facts is None else asdict(facts)


def _fact_cells(facts) -> list:
    values = _fact_dict(facts)
    return [values.get(column, "") for column in FACT_COLUMNS]


def _facts_text(facts, extra: str = "") -> str:
    return "" if facts is None else f"  ({facts_text(facts)}{extra})"
