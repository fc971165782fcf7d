"""`simsearch export`: vectors with ids, paths, labels and clusters for other tools."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from simsearch.cli.common import (
    cli,
    index_option,
    json_option,
)
from simsearch.ops.export import FORMATS

log = logging.getLogger("simsearch")


@cli.command()
@index_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="npy",
    show_default=True,
    help="npy: a folder with vectors.npy, ids.npy, paths.txt; csv: id,path,vector (JSON "
    "list); parquet: id, path, vector columns (needs pyarrow: simsearch[parquet]).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="File (csv, parquet) or new folder (npy) to write; never overwritten.",
)
@click.option(
    "--shard-rows",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="parquet: write OUTPUT as a new folder of files of N rows each (part-00000.parquet, "
    "...), the shards `simsearch shards build` reads.",
)
@json_option
@click.pass_obj
def export(obj, index_path, fmt, output, shard_rows, as_json):
    """Write every indexed image's id, path and vector, for numpy, pandas or another store.

    Reads one consistent snapshot (indexing may continue meanwhile) in chunks, so memory
    stays flat at any size, and writes under a temporary name renamed into place when
    complete.

    \b
    Examples:
      simsearch export -o vectors/            # then: np.load("vectors/vectors.npy")
      simsearch export --format parquet -o photos.parquet
      simsearch export --format csv -o photos.csv --index indexes/family
      simsearch export --format parquet --shard-rows 1000000 -o shards/
    """
    from tqdm import tqdm

    from simsearch.api import Index

    no_bar = True if obj["quiet"] else None
    with (
        Index.open(index_path) as idx,
        tqdm(desc="exporting", unit="img", file=sys.stderr, disable=no_bar) as bar,
    ):
        count = idx.export(output, fmt, progress=bar, shard_rows=shard_rows)
    if as_json:
        click.echo(json.dumps({"count": count, "format": fmt, "output": str(output)}))
    else:
        click.echo(f"exported {count} vectors to {output} ({fmt})")
