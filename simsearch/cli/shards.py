"""`simsearch shards`: an on-disk IVF-PQ index built from parquet shards, and its search."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from simsearch.cli.common import cli, json_option
from simsearch.config import DEFAULT_NPROBE, DEFAULT_RERANK


@cli.group()
def shards():
    """Index collections too large for one in-memory build, from parquet shards.

    The shards are parquet files with columns id (int64), vector (a list of floats) and,
    optionally, path: what `simsearch export --format parquet --shard-rows N` writes, and
    what clip-retrieval and autofaiss read. The index's inverted lists live on disk and
    are memory-mapped by searchers, so a machine with little RAM can serve it.

    \b
    Examples:
      simsearch export --format parquet --shard-rows 1000000 -o shards/
      simsearch shards build shards/ --out big-index/
      simsearch shards search big-index/ --id 42 -k 10
    """


@shards.command()
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="New folder to build the index in; never overwritten.",
)
@click.option(
    "--nlist",
    type=click.IntRange(min=1),
    default=None,
    help="Inverted lists (more: each query scans less, training takes longer).  "
    "[default: ~4 sqrt(rows), at most 4096]",
)
@click.option(
    "--m",
    type=click.IntRange(min=1),
    default=None,
    help="PQ codes per vector, one byte each; must divide the dimension.  "
    "[default: one per 8 dimensions, at least 16]",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    help="Vectors drawn from the shards to train on.  [default: 40 per list, at least 9,984]",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Fill the shards in parallel Ray tasks: alone, on a Ray started for the build; with "
    "an ADDRESS (auto, ray://host:10001), on that cluster, whose workers must see the "
    "shards and the output's folder at the same paths.  [default: one after another here]",
)
@json_option
@click.pass_obj
def build(obj, shards_dir, output, nlist, m, sample, ray_address, as_json):
    """Build an on-disk IVF-PQ index in OUT from the parquet shards in SHARDS_DIR.

    Stages: check every row (dimension, finite, non-zero, unique ids) while copying the
    vectors as float16 for re-ranking; train on a sample; fill one index per shard; merge
    them into index.faiss + index.ivfdata. Everything is built in a temporary folder
    renamed to OUT when complete: a failure leaves no OUT.

    \b
    Examples:
      simsearch shards build shards/ --out big-index/
      simsearch shards build shards/ --out big-index/ --nlist 4096 --m 96 --ray
      simsearch shards build shards/ --out big-index/ --ray auto --json
    """
    from tqdm import tqdm

    from simsearch.ops.shards import build as build_index

    no_bar = True if obj["quiet"] else None
    with tqdm(desc="checking", unit="vec", file=sys.stderr, disable=no_bar) as bar:
        report = build_index(
            shards_dir, output, nlist=nlist, m=m, sample=sample, ray=ray_address, progress=bar
        )
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in report.seconds.items())
    size = sum(report.bytes.values()) / 2**30
    click.echo(
        f"built {output}: {report.rows:,} vectors ({report.dim}-dim) from {report.shards} "
        f"shards as {report.factory}, {size:.2f} GiB; {stages}"
    )


@shards.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--id",
    "ids",
    type=int,
    multiple=True,
    help="Query by the vector of this id (repeatable).",
)
@click.option(
    "--vector-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Query by the vectors of a .npy file (one vector, or one per row).",
)
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Results.")
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    default=None,
    help="Inverted lists visited per query; more finds more true neighbours, more slowly.  "
    f"[default: {DEFAULT_NPROBE}; past 2M vectors, a 32nd of the lists (128 of 4,096)]",
)
@click.option(
    "--rerank",
    type=click.IntRange(min=0),
    default=None,
    help="Re-rank k x this many candidates by their exact scores on the stored vectors; "
    f"0 = the compressed codes' scores.  [default: {DEFAULT_RERANK}; past 2M vectors, 20]",
)
@json_option
def search(index_dir, ids, vector_file, k, nprobe, rerank, as_json):
    """Find the nearest vectors in the on-disk index INDEX_DIR (`shards build`).

    \b
    Examples:
      simsearch shards search big-index/ --id 42 --id 7 -k 20
      simsearch shards search big-index/ --vector-file query.npy --json

    --json prints one line per query:
    {"query": "id:42", "hits": [{"id": 42, "path": "a.jpg", "score": 1.0}, ...]}
    """
    import numpy as np

    from simsearch.search.ondisk import OnDiskIndex

    if not ids and vector_file is None:
        raise click.UsageError("give a query: --id N or --vector-file FILE")
    index = OnDiskIndex.open(index_dir)
    names, queries = [], []
    for id in ids:
        try:
            queries.append(index.vector(index.row_of(id)))
        except KeyError:
            raise click.BadParameter(f"no vector has id {id}", param_hint="--id") from None
        names.append(f"id:{id}")
    if vector_file is not None:
        try:
            loaded = np.atleast_2d(np.load(vector_file, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--vector-file") from None
        if loaded.ndim != 2:
            raise click.BadParameter("not one vector or a matrix", param_hint="--vector-file")
        queries.extend(loaded.astype(np.float32))
        names.extend(f"{vector_file}:{n}" for n in range(len(loaded)))
    results = index.search(np.stack(queries), k, nprobe=nprobe, rerank=rerank)
    for name, found in zip(names, results, strict=True):
        if as_json:
            click.echo(json.dumps({"query": name, "hits": [asdict(h) for h in found.hits]}))
            continue
        click.echo(f"query: {name}")
        click.echo(f"{'rank':>4}  {'score':>6}  {'id':>10}  path")
        for rank, hit in enumerate(found.hits, 1):
            click.echo(f"{rank:>4}  {hit.score:6.4f}  {hit.id:>10}  {hit.path}")
