"""`simsearch info`, `verify` and `repair`: what an index holds, and whether it is sound."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

import click

from simsearch.cli.common import (
    _clusters_line,
    _human_bytes,
    _index_type_line,
    check_output,
    cli,
    csv_option,
    csv_rows,
    index_option,
    json_option,
)

log = logging.getLogger("simsearch")


@cli.command()
@index_option
@click.option("--errors", is_flag=True, help="List every file that failed, with the reason.")
@json_option
@csv_option
def info(index_path, errors, as_json, as_csv):
    """Show what an index holds: counts, model, vector settings, size on disk.

    \b
    Examples:
      simsearch info
      simsearch info --errors
      simsearch info --json | jq .indexed
      simsearch info --errors --csv > failed.csv   # path,error: the failed files
    """
    from simsearch.api import Index

    check_output(as_json, as_csv)
    if as_csv and not errors:
        raise click.UsageError("--csv prints the rows of --errors; add --errors")

    with Index.open(index_path) as idx:
        about = idx.info()
        failed = idx.failed() if errors else []
    if as_csv:
        csv_rows(["path", "error"], ([f.path, f.error] for f in failed))
        return
    if as_json:
        data = asdict(about)
        if errors:
            data["errors"] = [asdict(f) for f in failed]
        click.echo(json.dumps(data))
        return
    revision = f", revision {about.revision[:12]}" if about.revision else ""
    click.echo(f"index:    {about.path}")
    click.echo(f"images:   {about.indexed} indexed, {about.failed} failed")
    click.echo(
        f"model:    {about.model} ({about.architecture}, weights "
        f"{about.weights_sha256[:12]}{revision})"
    )
    click.echo(
        f"vectors:  {about.dim}-dim, layer {about.layer} of {about.num_layers}, "
        f"{about.pool} pooling, {about.precision}, cosine"
    )
    click.echo(f"search:   {_index_type_line(about).removeprefix('vector index: ')}")
    cal = about.dedup_calibration
    if cal:
        click.echo(
            f"dedup:    threshold {cal['threshold']:.4f} (expected precision "
            f"{cal['precision']:.3f}, recall {cal['recall']:.3f}; calibrated {cal['created']})"
        )
    else:
        click.echo("dedup:    threshold not calibrated yet (the first `simsearch dedup` does it)")
    if about.label_model:
        click.echo(
            f"labels:   {about.labelled} images labelled by {about.label_model} "
            f"(top {about.label_top})"
        )
    click.echo(f"clusters: {_clusters_line(about)}")
    click.echo(f"size:     {_human_bytes(about.size_bytes)} on disk")
    if errors:
        for f in failed:
            click.echo(f"failed:   {f.path}: {f.error}")


@cli.command()
@index_option
@json_option
def verify(index_path, as_json):
    """Check every invariant of an index; exit 1 and describe each one that fails.

    Checks the database (SQLite integrity, one finite unit vector of the right dimension
    per indexed image, no stray vectors), manifest.json, and that vectors.faiss matches the
    database (generation, count, ids, every vector). While `simsearch index` runs, the
    FAISS file is reported stale until it finishes. `simsearch repair` fixes what it can.

    \b
    Examples:
      simsearch verify
      simsearch verify --index indexes/family --json
    """
    from simsearch.api import Index

    with Index.open(index_path) as idx:
        problems = idx.verify()
        indexed, failed = (0, 0) if problems else idx.store.counts()
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems}))
    elif problems:
        for problem in problems:
            click.echo(f"problem: {problem}")
    else:
        click.echo(f"ok: {indexed} indexed images, {failed} failed files, all invariants hold")
    if problems:
        sys.exit(1)


@cli.command()
@index_option
@json_option
def repair(index_path, as_json):
    """Rebuild what can be rebuilt from the database, then verify.

    Rewrites vectors.faiss and manifest.json from meta.sqlite, deletes stray vectors, and
    marks images whose vectors are damaged to be embedded again by the next `simsearch
    index`. Takes the write lock. A damaged meta.sqlite cannot be repaired.

    \b
    Examples:
      simsearch repair && simsearch index ~/Pictures
    """
    from simsearch.api import Index

    with Index.open(index_path) as idx:
        actions = idx.repair()
        problems = idx.verify()
    if as_json:
        click.echo(json.dumps({"actions": actions, "ok": not problems, "problems": problems}))
    else:
        for action in actions or ["nothing to repair"]:
            click.echo(action)
        for problem in problems:
            click.echo(f"problem: {problem}")
    if problems:
        sys.exit(1)
