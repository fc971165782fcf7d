"""`simsearch index`: bringing an index up to date with folders of images (and labels)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click

from simsearch.cli.common import (
    _index_type_json,
    _index_type_line,
    backend_option,
    batch_option,
    cli,
    device_option,
    index_option,
    json_option,
    precision_option,
)
from simsearch.cli.render import add_line, label_line
from simsearch.config import (
    DEFAULT_LABEL_MODEL,
    DEFAULT_LABEL_TOP,
    DEFAULT_MODEL,
    DEFAULT_WORKERS,
    MAX_IMAGE_PIXELS,
    OTHER_SUFFIXES,
    RAW_SUFFIXES,
)
from simsearch.media.objects import is_url
from simsearch.models.embed import POOLS
from simsearch.records import stages_line

log = logging.getLogger("simsearch")


class _FolderOrURL(click.Path):
    """A folder or file that exists, or an object-store URL (s3://bucket/prefix), as is."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and is_url(value):
            return value
        return super().convert(value, param, ctx)


@cli.command()
@click.argument("dirs", nargs=-1, type=_FolderOrURL(exists=True, path_type=Path))
@index_option
@click.option(
    "--model",
    envvar="SIMSEARCH_MODEL",
    show_envvar=True,
    help=f"Hub id or local folder of the backbone. New index: defaults to {DEFAULT_MODEL}; "
    "existing index: its own model (a folder with the same weights may be given); an "
    "`simsearch export-model` folder (runs with ONNX Runtime).",
)
@click.option(
    "--layer",
    type=int,
    default=None,
    help="Hidden state to embed: 0 = patch embeddings, 1..N = blocks, negative from the end. "
    "New index: -1 (last block, after the final norm).",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default=None,
    help="[CLS] token or mean of the patch tokens. New index: cls.",
)
@backend_option
@batch_option
@device_option
@precision_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads that read and decode images.  [default: min(4, cores)]",
)
@click.option(
    "--prune/--no-prune",
    default=True,
    show_default=True,
    help="Remove indexed files under DIRS that no longer exist.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=MAX_IMAGE_PIXELS,
    show_default=True,
    help="Refuse images with more pixels than this (decompression bombs), unread.",
)
@click.option(
    "--index-type",
    metavar="TYPE",
    default=None,
    help="Vector index: auto, flat (exact), hnsw (graph, ~1 ms), ivf (inverted lists), ivfpq "
    "(compressed, for tens of millions), or a FAISS factory string such as IVF1024,SQ8. "
    "New index: auto (flat, then hnsw past 50,000 vectors, then ivfpq past 4 GiB of vectors). "
    "Existing index: changes its type and rebuilds it from the stored vectors.",
)
@click.option(
    "--label-model",
    metavar="M",
    envvar="SIMSEARCH_LABEL_MODEL",
    show_envvar=True,
    help="Also store each image's top labels from this image classification model (hub id "
    f"or folder, e.g. {DEFAULT_LABEL_MODEL}), for `search --label`. Reads new files a second "
    "time. Labels from another model are all replaced.",
)
@click.option(
    "--label-top",
    type=click.IntRange(min=1),
    default=None,
    help=f"Labels stored per image.  [default: {DEFAULT_LABEL_TOP}, or the index's]",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Read, decode and embed on a Ray cluster (needs simsearch[ray]): --ray alone joins "
    "the cluster RAY_ADDRESS or `ray start` on this machine names, else starts one here; "
    "--ray HOST:6379 joins that one. Files must be at the same paths on every node (shared "
    "storage) or be object-store URLs. This process still lists, decides and commits.",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Embedding workers on the cluster, one model each.",
)
@click.option(
    "--ray-gpus-per-worker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs each embedding worker asks Ray for (0: it embeds on CPUs; 0.5: two share one).",
)
@click.option(
    "--ray-cpus-per-worker",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="CPUs each embedding worker reserves (its model's threads); the rest read images.",
)
@click.option("--strict", is_flag=True, help="Exit with status 3 if any file failed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notices (as simsearch -q).")
@json_option
@click.pass_obj
def index(
    obj,
    quiet,
    dirs,
    index_path,
    model,
    layer,
    pool,
    backend,
    batch_size,
    device,
    precision,
    workers,
    prune,
    max_pixels,
    index_type,
    label_model,
    label_top,
    ray_address,
    ray_workers,
    ray_gpus_per_worker,
    ray_cpus_per_worker,
    strict,
    as_json,
):
    """Bring an index up to date with the images under DIRS, creating it if needed.

    Folders are searched recursively for every image format the installed Pillow reads
    (HEIC and camera RAW with the heic and raw extras); a folder whose files were all skipped
    for their suffix says which suffixes and how to include them.
    Unchanged files (same size and mtime) are skipped unread; renamed files and copies of
    indexed files reuse their vectors; files gone from DIRS are removed (--no-prune keeps
    them). Files that cannot be read are recorded with the reason (`simsearch info
    --errors`) and the run goes on. Work is committed in batches: after a crash or Ctrl-C,
    the same command continues where it stopped. One writer at a time per index; searches
    keep working while it runs.

    \b
    Examples:
      simsearch index ~/Pictures
      simsearch index photos/ scans/ --index indexes/family
      simsearch index photos/ --model ./models/vit-base --layer -2 --pool mean
      simsearch index photos/ --backend onnx --model ./vit-onnx   # export-model's folder
      simsearch index photos/ --backend torch     # PyTorch whatever auto would pick
      simsearch index photos/ --strict --json     # for scripts: exit 3 if any file failed
      simsearch index --index-type hnsw           # no DIRS: only change the index type
      simsearch index photos/ --label-model google/vit-large-patch16-384
      simsearch index --label-model ./models/convnext --label-top 3   # only (re)label
      simsearch index s3://bucket/photos          # objects: AWS_* variables say where
      simsearch index /shared/photos --ray --ray-workers 4 --ray-gpus-per-worker 1

    With --label-model, every indexed image without labels from that model is labelled
    after indexing (its file is read a second time), in committed batches; a second run
    labels only what is new or changed. Labels of another model are replaced.
    """
    from tqdm import tqdm

    from simsearch.api import Index

    quiet = quiet or obj["quiet"]
    ray = None
    if ray_address is not None:
        from simsearch.ops.ray_ingest import RaySettings

        ray = RaySettings(
            address=ray_address or None,
            workers=ray_workers,
            gpus_per_worker=ray_gpus_per_worker,
            cpus_per_worker=ray_cpus_per_worker,
        )
    # disable=None: tqdm draws only when stderr is a terminal.
    no_bar = True if quiet else None
    if not dirs:
        if index_type is None and label_model is None:
            raise click.UsageError(
                "give the folders to index (DIRS), or --index-type, or --label-model"
            )
        with Index.open(
            index_path,
            model=model,
            layer=layer,
            pool=pool,
            device=device,
            precision=precision,
            batch_size=batch_size,
            backend=backend,
        ) as idx:
            if index_type is not None:
                idx.set_index_type(index_type)
            labelled = _label_index(idx, label_model, label_top, workers, no_bar)
            about = idx.info()
        out = _index_type_json(about) if index_type is not None else {}
        if labelled is not None:
            out["labels"] = asdict(labelled)
        if as_json:
            click.echo(json.dumps(out))
            return
        if index_type is not None:
            click.echo(_index_type_line(about))
        if labelled is not None:
            click.echo(label_line(labelled))
        return
    idx = Index.open_or_create(
        index_path,
        model,
        layer=layer,
        pool=pool,
        device=device,
        precision=precision,
        batch_size=batch_size,
        index_type=index_type,
        backend=backend,
    )
    with idx:
        m = idx.manifest
        log.info(
            "model %s: %d-dim, layer %d of %d, %s pooling",
            m.model,
            m.dim,
            m.layer,
            m.num_layers,
            m.pool,
        )
        if quiet:
            logging.getLogger("simsearch").setLevel(logging.ERROR)
        with tqdm(desc="indexing", unit="img", file=sys.stderr, disable=no_bar) as bar:
            summary = idx.add(
                dirs,
                workers=workers or DEFAULT_WORKERS,
                prune=prune,
                max_pixels=max_pixels,
                progress=bar,
                ray=ray,
            )
        labelled = _label_index(idx, label_model, label_top, workers, no_bar)
        about = idx.info() if index_type is not None or summary.rebuilt else None
        unlabelled = None
        if label_model is None:
            # An index that has labels keeps them complete only when told the model again.
            state = idx.info()
            if state.label_model and state.labelled < state.indexed:
                unlabelled = (state.indexed - state.labelled, state.label_model)
    if summary.skipped_suffixes:  # even with --quiet: a folder of photos gave nothing
        click.echo(_skipped_line(summary.skipped_suffixes), err=True)
    if not quiet:
        click.echo(stages_line(summary.stages), err=True)
        if about is not None:
            click.echo(_index_type_line(about), err=True)
        if unlabelled is not None:
            click.echo(
                f"{unlabelled[0]} indexed images have no labels yet; label them with "
                f"--label-model {unlabelled[1]}",
                err=True,
            )
    if as_json:
        out = asdict(summary)
        if labelled is not None:
            out["labels"] = asdict(labelled)
        click.echo(json.dumps(out))
    else:
        click.echo(add_line(summary))
        if labelled is not None:
            click.echo(label_line(labelled))
    if strict and summary.failed:
        click.echo(
            f"Error: {summary.failed} files failed (--strict); see `simsearch info --errors`",
            err=True,
        )
        sys.exit(3)


# Suffixes named in the notice about folders with no image files; the rest are counted.
SKIPPED_SHOWN = 8

# What pillow-heif (the `heic` extra) opens: iPhone photos. The notice names the extra.
HEIF_SUFFIXES = frozenset({".heic", ".heics", ".heif", ".heifs", ".hif"})


def _skipped_line(counts: dict[str, int]) -> str:
    """Return the notice for folders whose files were all skipped for their suffix: which
    suffixes, and how to include them."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    names = {"": "(no suffix)", OTHER_SUFFIXES: "(other suffixes)"}
    named = ", ".join(f"{names.get(ext, ext)} ({n})" for ext, n in ranked[:SKIPPED_SHOWN])
    if len(ranked) > SKIPPED_SHOWN:
        named += f" and {len(ranked) - SKIPPED_SHOWN} more"
    hints = []
    if counts.keys() & HEIF_SUFFIXES:
        hints.append("HEIC/HEIF photos need the heic extra: pip install 'simsearch[heic]'")
    if counts.keys() & RAW_SUFFIXES:
        hints.append("camera RAW files need the raw extra: pip install 'simsearch[raw]'")
    if counts.keys() - HEIF_SUFFIXES - RAW_SUFFIXES:
        hints.append("a file named directly is tried whatever its suffix: simsearch index FILE...")
    what = f"every file was skipped for its extension: {named}"
    return f"no image files in a folder given: {what}. " + "; ".join(hints)


def _label_index(idx, label_model, label_top, workers, no_bar):
    """Label the index's images with `label_model` (None: do nothing); the summary."""
    if label_model is None:
        return None
    from tqdm import tqdm

    with tqdm(desc="labelling", unit="img", file=sys.stderr, disable=no_bar) as bar:
        return idx.label_images(
            label_model, top=label_top, workers=workers or DEFAULT_WORKERS, progress=bar
        )
