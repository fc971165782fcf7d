"""`simsearch cluster`: groups of similar images by spherical k-means."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

import click

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
from simsearch.cli.render import cluster_run_line
from simsearch.config import (
    CLUSTER_AUTO_MAX_K,
    CLUSTER_MAX_K,
    CLUSTER_TOP,
)

log = logging.getLogger("simsearch")


class _KType(click.ParamType):
    """-k: a number of clusters (2 or more) or `auto`."""

    name = "K"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of clusters nor 'auto'", param, ctx)
        if k < 2:
            self.fail(f"{k} clusters: give at least 2, or 'auto'", param, ctx)
        return k


@cli.command()
@index_option
@click.option(
    "-k",
    "k",
    type=_KType(),
    default=None,
    help=f"Number of clusters (2 to the number of images, at most {CLUSTER_MAX_K:,}), or "
    f"auto: the K from 2 to {CLUSTER_AUTO_MAX_K} with the best mean silhouette (cosine "
    "distance) on a sample of 2,000 images.",
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=CLUSTER_TOP,
    show_default=True,
    help="Images shown per cluster: those nearest its centre.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Random seed of the sampling and seeding; the same seed gives the same clusters.",
)
@click.option(
    "--show", is_flag=True, help="Print the stored clusters of the last run; compute nothing."
)
@json_option
@csv_option
@html_option
@click.pass_obj
def cluster(obj, index_path, k, top, seed, show, as_json, as_csv, html_path):
    """Group the indexed images into K clusters of similar images, and store them.

    Spherical k-means (FAISS) trains on a random sample of the stored vectors (at most
    100,000), then assigns every image to its nearest centre, a chunk at a time: memory
    stays bounded at any size. Clusters are numbered by size, 1 the largest, and listed
    with the images nearest their centre (score: cosine similarity to it). Each image's
    cluster and the run's settings are stored in the index, replacing the last run's:
    `search --cluster N` searches one cluster, `info` shows the run. Images indexed
    afterwards have no cluster until the next run. Takes the write lock while it runs.

    \b
    Examples:
      simsearch cluster -k 20
      simsearch cluster -k auto --top 3
      simsearch cluster --show --json | jq -r '.central[0].path'
      simsearch cluster --show --top 8 --html clusters.html   # a page to browse
      simsearch search holiday.jpg --cluster 4

    --json prints one cluster per line:
    {"cluster": 1, "size": 120, "cohesion": 0.81, "central": [{"id": 7, "path": "/p/a.jpg",
    "score": 0.93}, ...]}
    """
    from tqdm import tqdm

    from simsearch.api import Index

    check_output(as_json, as_csv)
    if show and k is not None:
        raise click.UsageError("--show prints the stored clusters; leave out -k")
    if not show and k is None:
        raise click.UsageError("give -k K (a number, or auto), or --show for the stored clusters")
    no_bar = True if obj["quiet"] else None
    with Index.open(index_path) as idx:
        if show:
            run = idx.clustering()
            if run is None:
                raise click.ClickException(
                    f"{index_path} has no clusters yet: make them with `simsearch cluster -k K`"
                )
        else:
            with tqdm(desc="clustering", unit="img", file=sys.stderr, disable=no_bar) as bar:
                run = idx.cluster(k, seed=seed, progress=bar)
        clusters = idx.clusters(top)
        unassigned = len(idx) - sum(c.size for c in clusters)
    if as_csv:
        rows = (
            [
                group.id,
                group.size,
                f"{group.cohesion:.4f}",
                rank,
                hit.id,
                f"{hit.score:.4f}",
                hit.path,
            ]
            for group in clusters
            for rank, hit in enumerate(group.central, 1)
        )
        csv_rows(["cluster", "size", "cohesion", "rank", "id", "score", "path"], rows)
    for group in clusters:
        if as_csv:
            break
        if as_json:
            central = [asdict(hit) for hit in group.central]
            line = {"cluster": group.id, "size": group.size, "cohesion": group.cohesion}
            click.echo(json.dumps({**line, "central": central}))
            continue
        click.echo(
            f"cluster {group.id}: {group.size} image{'' if group.size == 1 else 's'}, "
            f"mean similarity to centre {group.cohesion:.4f}"
        )
        for hit in group.central:
            click.echo(f"  {hit.score:6.4f}  {hit.path}")
    if not as_json and not as_csv:
        click.echo(cluster_run_line(run))
        if unassigned:
            click.echo(
                f"{unassigned} images indexed since the run have no cluster; "
                "run `simsearch cluster -k K` again to include them"
            )
    if html_path is not None:
        from simsearch.ops.report import cluster_page

        shown = cluster_page(clusters, html_path, complete="simsearch cluster --show --json")
        _report_written(obj, html_path, shown)
