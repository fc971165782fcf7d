"""The `simsearch` command: parse arguments, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import click
from sqlalchemy.exc import DatabaseError

from simsearch import __version__
from simsearch.config import (
    CALIBRATION_SAMPLE,
    CLUSTER_AUTO_MAX_K,
    CLUSTER_MAX_K,
    CLUSTER_TOP,
    DEDUP_NEIGHBOURS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EF,
    DEFAULT_INDEX,
    DEFAULT_K,
    DEFAULT_LABEL_MODEL,
    DEFAULT_LABEL_TOP,
    DEFAULT_MODEL,
    DEFAULT_NPROBE,
    DEFAULT_RERANK,
    MAX_IMAGE_PIXELS,
)
from simsearch.errors import SimsearchError

log = logging.getLogger("simsearch")


class _Group(click.Group):
    """A click group whose errors are one line on stderr, never a usage dump or traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except SimsearchError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except DatabaseError as exc:
            click.echo(
                f"Error: the index database is damaged or unreadable ({exc.orig}); restore it "
                "from a backup, or index into a new --index",
                err=True,
            )
            sys.exit(1)
        except click.Abort:
            click.echo("Interrupted; everything committed before it is kept.", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


class _TqdmHandler(logging.Handler):
    """Writes log records through tqdm, so notices do not tear progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = (
        logging.ERROR
        if quiet
        else logging.DEBUG
        if verbose > 1
        else (logging.INFO if verbose else logging.WARNING)
    )
    logging.getLogger("simsearch").setLevel(level)


index_option = click.option(
    "--index",
    "index_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_INDEX,
    envvar="SIMSEARCH_INDEX",
    show_default=True,
    show_envvar=True,
    help="Index folder.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
html_option = click.option(
    "--html",
    "html_path",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a page with thumbnails to FILE (self-contained: it can be mailed). "
    "An existing FILE is replaced.",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the model runs; auto uses CUDA when there is one.",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]),
    default="auto",
    envvar="SIMSEARCH_PRECISION",
    show_default=True,
    show_envvar=True,
    help="Arithmetic of the model: auto = fp16 on CUDA, bf16 on CPUs with native bf16, "
    "else fp32; int8 = quantised linear layers (CPU).",
)
batch_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images per model call.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="simsearch")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notices, only results.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Image similarity search: index folders of images, find the ones that look alike.

    \b
    Quick start:
      simsearch index ~/Pictures                 # embed every image (incremental)
      simsearch search query.jpg -k 5            # the 5 most similar indexed images
      simsearch info                             # what is in the index

    Without hub access, point --model (or SIMSEARCH_MODEL) at a folder written by
    transformers' save_pretrained.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


@cli.command()
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@index_option
@click.option(
    "--model",
    envvar="SIMSEARCH_MODEL",
    show_envvar=True,
    help=f"Hub id or local folder of the backbone. New index: defaults to {DEFAULT_MODEL}; "
    "existing index: its own model (a folder with the same weights may be given).",
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
    type=click.Choice(["cls", "mean"]),
    default=None,
    help="[CLS] token or mean of the patch tokens. New index: cls.",
)
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
    batch_size,
    device,
    precision,
    workers,
    prune,
    max_pixels,
    index_type,
    label_model,
    label_top,
    strict,
    as_json,
):
    """Bring an index up to date with the images under DIRS, creating it if needed.

    Folders are searched recursively for jpg, jpeg, png, webp, bmp, gif and tiff files.
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
      simsearch index photos/ --strict --json     # for scripts: exit 3 if any file failed
      simsearch index --index-type hnsw           # no DIRS: only change the index type
      simsearch index photos/ --label-model google/vit-large-patch16-384
      simsearch index --label-model ./models/convnext --label-top 3   # only (re)label

    With --label-model, every indexed image without labels from that model is labelled
    after indexing (its file is read a second time), in committed batches; a second run
    labels only what is new or changed. Labels of another model are replaced.
    """
    from tqdm import tqdm

    from simsearch.api import Index
    from simsearch.config import DEFAULT_WORKERS

    quiet = quiet or obj["quiet"]
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
            click.echo(labelled.line())
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
            )
        labelled = _label_index(idx, label_model, label_top, workers, no_bar)
        about = idx.info() if index_type is not None or summary.rebuilt else None
        unlabelled = None
        if label_model is None:
            # An index that has labels keeps them complete only when told the model again.
            state = idx.info()
            if state.label_model and state.labelled < state.indexed:
                unlabelled = (state.indexed - state.labelled, state.label_model)
    if not quiet:
        from simsearch.records import stages_line

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
        click.echo(summary.line())
        if labelled is not None:
            click.echo(labelled.line())
    if strict and summary.failed:
        click.echo(
            f"Error: {summary.failed} files failed (--strict); see `simsearch info --errors`",
            err=True,
        )
        sys.exit(3)


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
    help="Where the index's model is now, if its folder moved.",
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
@device_option
@precision_option
@json_option
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
    device,
    precision,
    as_json,
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
    """
    from simsearch.api import Index

    with Index.open(index_path, model=model, device=device, precision=precision) as idx:
        results = idx.search_many(
            list(queries),
            k,
            nprobe=nprobe,
            ef=ef,
            rerank=rerank,
            label=label,
            cluster=cluster,
        )
    for query, hits in zip(queries, results, strict=True):
        if as_json:
            click.echo(json.dumps({"query": query, "hits": [asdict(h) for h in hits]}))
            continue
        click.echo(f"query: {query}")
        click.echo(f"{'rank':>4}  {'score':>6}  path")
        for rank, hit in enumerate(hits, 1):
            click.echo(f"{rank:>4}  {hit.score:6.4f}  {hit.path}")
    if html_path is not None:
        from simsearch.report import search_page

        shown = search_page(list(zip(queries, results, strict=True)), html_path)
        _report_written(obj, html_path, shown)


@cli.command()
@index_option
@click.option("--errors", is_flag=True, help="List every file that failed, with the reason.")
@json_option
def info(index_path, errors, as_json):
    """Show what an index holds: counts, model, vector settings, size on disk.

    \b
    Examples:
      simsearch info
      simsearch info --errors
      simsearch info --json | jq .indexed
    """
    from simsearch.api import Index

    with Index.open(index_path) as idx:
        about = idx.info()
        failed = idx.failed() if errors else []
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
def label(images, model, top, batch_size, device, precision, as_json):
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
    """
    from simsearch.images import find_images
    from simsearch.label import Labeller

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
    for result in results:
        if result.error is not None:
            failed += 1
            click.echo(f"skipping {result.path}: {result.error}", err=True)
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
@click.option("--csv", "as_csv", is_flag=True, help="CSV: group,role,path,score.")
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
    The image to keep is the one with the highest resolution, then the largest file, then
    the oldest, then the shortest path; the others are listed with their similarity to it.

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

    --json prints one group per line:
    {"keep": "/photos/a.jpg", "duplicates": [{"path": "/photos/a-copy.jpg", "score": 0.97}]}
    """
    from tqdm import tqdm

    from simsearch.api import Index

    obj = ctx.obj
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
                click.echo(json.dumps(asdict(found)) if as_json else found.line())
                return
            if not obj["quiet"]:
                click.echo(found.line(), err=True)
        if threshold is None:
            threshold = idx.dedup_calibration().threshold
        with tqdm(desc="comparing", unit="img", file=sys.stderr, disable=no_bar) as bar:
            groups = idx.duplicates(threshold, neighbours=neighbours, progress=bar)
        _print_groups(groups, threshold, as_csv, as_json)
        if html_path is not None:  # before any move: the page shows the files in place
            from simsearch.report import dedup_page

            shown = dedup_page(groups, html_path, threshold=threshold)
            _report_written(obj, html_path, shown)
        done = None
        if move_to is not None:
            done = idx.move_duplicates(groups, move_to)
        elif delete:
            done = idx.delete_duplicates(groups)
    if done is not None:
        for path, reason in done.skipped:
            click.echo(f"left alone: {path}: {reason}", err=True)
        click.echo(done.line(), err=True)


def _undo_moves(ctx, manifest: Path, index_path: Path, as_json: bool) -> None:
    from click.core import ParameterSource

    from simsearch.api import Index
    from simsearch.moves import read_manifest

    header, _ = read_manifest(manifest)
    if ctx.get_parameter_source("index_path") in (ParameterSource.DEFAULT, None):
        index_path = Path(header["index"])  # the manifest names its index
    with Index.open(index_path) as idx:
        report = idx.undo_moves(manifest)
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    for path, reason in report.skipped:
        click.echo(f"left alone: {path}: {reason}")
    click.echo(report.line())


def _print_groups(groups, threshold: float, as_csv: bool, as_json: bool) -> None:
    if as_csv:
        import csv

        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["group", "role", "path", "score"])
        for n, group in enumerate(groups, 1):
            out.writerow([n, "keep", group.keep_path, ""])
            for dup in group.duplicates:
                out.writerow([n, "duplicate", dup.path, f"{dup.score:.4f}"])
        return
    for group in groups:
        if as_json:
            dups = [{"path": d.path, "score": d.score} for d in group.duplicates]
            click.echo(json.dumps({"keep": group.keep_path, "duplicates": dups}))
            continue
        click.echo(f"keep       {group.keep_path}")
        for dup in group.duplicates:
            click.echo(f"  {dup.score:6.4f}  {dup.path}")
    if not as_json:
        count = sum(len(g.duplicates) for g in groups)
        click.echo(f"{len(groups)} groups, {count} duplicates (threshold {threshold})")


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
    type=int,
    default=0,
    show_default=True,
    help="Random seed of the sampling and seeding; the same seed gives the same clusters.",
)
@click.option(
    "--show", is_flag=True, help="Print the stored clusters of the last run; compute nothing."
)
@json_option
@html_option
@click.pass_obj
def cluster(obj, index_path, k, top, seed, show, as_json, html_path):
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
    for group in clusters:
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
    if not as_json:
        click.echo(run.line())
        if unassigned:
            click.echo(
                f"{unassigned} images indexed since the run have no cluster; "
                "run `simsearch cluster -k K` again to include them"
            )
    if html_path is not None:
        from simsearch.report import cluster_page

        shown = cluster_page(clusters, html_path)
        _report_written(obj, html_path, shown)


@cli.command()
@index_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["npy", "csv", "parquet"]),
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
@json_option
@click.pass_obj
def export(obj, index_path, fmt, output, as_json):
    """Write every indexed image's id, path and vector, for numpy, pandas or another store.

    Reads one consistent snapshot (indexing may continue meanwhile) in chunks, so memory
    stays flat at any size, and writes under a temporary name renamed into place when
    complete.

    \b
    Examples:
      simsearch export -o vectors/            # then: np.load("vectors/vectors.npy")
      simsearch export --format parquet -o photos.parquet
      simsearch export --format csv -o photos.csv --index indexes/family
    """
    from tqdm import tqdm

    from simsearch.api import Index

    no_bar = True if obj["quiet"] else None
    with (
        Index.open(index_path) as idx,
        tqdm(desc="exporting", unit="img", file=sys.stderr, disable=no_bar) as bar,
    ):
        count = idx.export(output, fmt, progress=bar)
    if as_json:
        click.echo(json.dumps({"count": count, "format": fmt, "output": str(output)}))
    else:
        click.echo(f"exported {count} vectors to {output} ({fmt})")


def _report_written(obj, path: Path, shown: int) -> None:
    if not obj["quiet"]:
        click.echo(f"wrote {path} ({shown} images)", err=True)


def _label_index(idx, label_model, label_top, workers, no_bar):
    """Label the index's images with `label_model` (None: do nothing); the summary."""
    if label_model is None:
        return None
    from tqdm import tqdm

    from simsearch.config import DEFAULT_WORKERS

    with tqdm(desc="labelling", unit="img", file=sys.stderr, disable=no_bar) as bar:
        return idx.label_images(
            label_model, top=label_top, workers=workers or DEFAULT_WORKERS, progress=bar
        )


def _index_type_line(about) -> str:
    line = f"vector index: {about.index_built} ({about.index_factory}); {about.index_reason}"
    if about.tombstones:
        line += f"; {about.tombstones} removed entries awaiting a rebuild"
    return line


def _clusters_line(about) -> str:
    run = about.clustering
    if run is None:
        return "none (simsearch cluster -k K makes them)"
    when = datetime.fromtimestamp(run.created_at).strftime("%Y-%m-%d %H:%M")
    how = "given" if run.chosen_by == "given" else "chosen by auto"
    line = (
        f"{run.clusters} (k={run.k} {how}, seed {run.seed}, {when}); "
        f"{about.clustered} images assigned"
    )
    unassigned = about.indexed - about.clustered
    if unassigned:
        line += f", {unassigned} indexed since are not (run `simsearch cluster` again)"
    return line


def _index_type_json(about) -> dict:
    keys = ("index_type", "index_built", "index_factory", "index_reason", "tombstones")
    return {key: getattr(about, key) for key in keys}


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
