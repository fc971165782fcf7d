"""`simsearch search`: the nearest indexed images to each query."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import click

from simsearch.cli.common import (
    _report_written,
    backend_option,
    check_output,
    cli,
    csv_option,
    csv_rows,
    device_option,
    html_option,
    index_option,
    json_option,
    precision_option,
)
from simsearch.config import (
    DEFAULT_EF,
    DEFAULT_K,
    DEFAULT_NPROBE,
    DEFAULT_RERANK,
)

log = logging.getLogger("simsearch")


@cli.command()
@click.argument("queries", nargs=-1, required=True)
@index_option
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=1),
    default=DEFAULT_K,
    show_default=True,
    help="Number of results per query.",
)
@click.option(
    "--model",
    envvar="SIMSEARCH_MODEL",
    show_envvar=True,
    help="Where the index's model is now, if its folder moved; or a folder that "
    "`simsearch export-model` made from it.",
)
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    default=None,
    help="IVF types: inverted lists visited per query; more finds more true neighbours, "
    f"more slowly.  [default: {DEFAULT_NPROBE}]",
)
@click.option(
    "--ef",
    type=click.IntRange(min=1),
    default=None,
    help=f"HNSW: candidates kept while walking the graph (at least k).  [default: {DEFAULT_EF}]",
)
@click.option(
    "--rerank",
    type=click.IntRange(min=0),
    default=None,
    help="Compressed types (ivfpq, ...): re-rank k x this many candidates by their exact "
    f"scores on the stored vectors; 0 = off.  [default: {DEFAULT_RERANK}]",
)
@click.option(
    "--label",
    metavar="NAME",
    default=None,
    help="Only images having NAME among their stored labels (`index --label-model`): the "
    "whole label or any of its comma-separated synonyms, any case (tabby matches "
    '"tabby, tabby cat").',
)
@click.option(
    "--cluster",
    type=int,
    default=None,
    metavar="N",
    help="Only images in cluster N of the last `simsearch cluster` run.",
)
@backend_option
@device_option
@precision_option
@json_option
@csv_option
@html_option
@click.pass_obj
def search(
    obj,
    queries,
    index_path,
    k,
    model,
    nprobe,
    ef,
    rerank,
    label,
    cluster,
    backend,
    device,
    precision,
    as_json,
    as_csv,
    html_path,
):
    """Find the indexed images most similar to each QUERY.

    A QUERY is an image file (indexed or not) or id:N for the indexed image with id N.
    Indexed, unchanged files and ids are answered from stored vectors without loading the
    model. Results are best first; an indexed query finds itself at score 1.

    \b
    Examples:
      simsearch search holiday.jpg
      simsearch search id:42 -k 20
      simsearch search a.jpg b.jpg --json | jq -r '.hits[0].path'
      simsearch search holiday.jpg -k 20 --html similar.html
      simsearch search beach.jpg --label "seashore"   # only images labelled seashore
      simsearch search holiday.jpg --cluster 3   # the nearest among cluster 3's images

    --json prints one line per query:
    {"query": "a.jpg", "hits": [{"id": 7, "path": "/photos/x.jpg", "score": 0.93}, ...]}
    --csv prints one row per hit: query,rank,id,score,path.
    """
    from simsearch.api import Index

    check_output(as_json, as_csv)

    with Index.open(
        index_path, model=model, device=device, precision=precision, backend=backend
    ) as idx:
        results = idx.search_many(
            list(queries),
            k,
            nprobe=nprobe,
            ef=ef,
            rerank=rerank,
            label=label,
            cluster=cluster,
        )
    if as_csv:
        rows = (
            [query, rank, hit.id, f"{hit.score:.4f}", hit.path]
            for query, hits in zip(queries, results, strict=True)
            for rank, hit in enumerate(hits, 1)
        )
        csv_rows(["query", "rank", "id", "score", "path"], rows)
    for query, hits in zip(queries, results, strict=True):
        if as_csv:
            break
        if as_json:
            click.echo(json.dumps({"query": query, "hits": [asdict(h) for h in hits]}))
            continue
        click.echo(f"query: {query}")
        click.echo(f"{'rank':>4}  {'score':>6}  path")
        for rank, hit in enumerate(hits, 1):
            click.echo(f"{rank:>4}  {hit.score:6.4f}  {hit.path}")
    if html_path is not None:
        from simsearch.ops.report import search_page

        shown = search_page(
            list(zip(queries, results, strict=True)),
            html_path,
            complete="simsearch search --json",
        )
        _report_written(obj, html_path, shown)
