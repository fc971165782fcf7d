"""`simsearch label`: the classification head's top labels for image files."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click

from simsearch.cli.common import (
    batch_option,
    check_output,
    cli,
    csv_option,
    csv_table,
    device_option,
    json_option,
    precision_option,
)
from simsearch.config import (
    DEFAULT_LABEL_MODEL,
    DEFAULT_LABEL_TOP,
)

log = logging.getLogger("simsearch")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    default=DEFAULT_LABEL_MODEL,
    envvar="SIMSEARCH_LABEL_MODEL",
    show_default=True,
    show_envvar=True,
    help="Image classification model: hub id or local folder (a checkpoint with a trained "
    "head and id2label class names).",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=DEFAULT_LABEL_TOP,
    show_default=True,
    help="Labels per image.",
)
@batch_option
@device_option
@precision_option
@json_option
@csv_option
def label(images, model, top, batch_size, device, precision, as_json, as_csv):
    """Name what each IMAGE shows: its top labels from a classification model.

    An IMAGE is a file or a folder (searched recursively for images). No index is needed.
    Files that cannot be read are reported on stderr and the others are still labelled;
    the exit status is then 1.

    \b
    Examples:
      simsearch label cat.jpg
      simsearch label photos/ --top 3
      simsearch label a.jpg --model ./models/vit-384 --json | jq -r '.labels[0].label'

    --json prints one line per image:
    {"path": "cat.jpg", "labels": [{"label": "tabby, tabby cat", "score": 0.91}, ...]}
    --csv prints one row per label: path,rank,label,score.
    """
    from simsearch.media.discover import find_images
    from simsearch.ops.label import Labeller

    check_output(as_json, as_csv)

    paths, missing = [], 0
    for image in images:
        if image.is_dir():
            paths += list(find_images([image]))
        elif image.exists() or image.is_symlink():
            paths.append(image)
        else:
            missing += 1
            click.echo(f"skipping {image}: no such file or directory", err=True)
    failed, results = missing, iter(())
    if paths:  # only missing files or empty folders: no need to load the model
        labeller = Labeller(model, device=device, precision=precision, batch_size=batch_size)
        results = labeller.label_files(paths, top)
    table = csv_table(["path", "rank", "label", "score"]) if as_csv else None
    for result in results:
        if result.error is not None:
            failed += 1
            click.echo(f"skipping {result.path}: {result.error}", err=True)
            continue
        if table is not None:  # row by row: a folder of thousands shows as it goes
            for rank, found in enumerate(result.labels, 1):
                table.writerow([result.path, rank, found.label, f"{found.score:.4f}"])
            continue
        if as_json:
            data = {"path": result.path, "labels": [asdict(x) for x in result.labels]}
            click.echo(json.dumps(data))
            continue
        click.echo(result.path)
        for found in result.labels:
            click.echo(f"  {found.score:6.4f}  {found.label}")
    if failed:
        total = len(paths) + missing
        click.echo(f"Error: {failed} of {total} images could not be labelled", err=True)
        sys.exit(1)
