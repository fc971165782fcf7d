"""The `simsearch` command group, its shared options and the helpers its commands share."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import sys
from datetime import datetime
from pathlib import Path

import click

from simsearch._version import __version__
from simsearch.cli.hints import explain
from simsearch.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INDEX,
)
from simsearch.errors import SimsearchError
from simsearch.fs.names import ESCAPE
from simsearch.models.embed import DEVICES, PRECISIONS
from simsearch.models.provider import BACKENDS

log = logging.getLogger("simsearch")


class _Group(click.Group):
    """A click group whose errors are one line on stderr, never a usage dump or traceback."""

    invoked: str | None = None  # the subcommand this run invoked, for error hints

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        self.invoked = name
        return name, cmd, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        for stream in (sys.stdout, sys.stderr):
            # A file name that is not UTF-8 is printed with its bytes escaped (caf\xe9.jpg),
            # never a UnicodeEncodeError; JSON output has none to escape (json.dumps writes
            # \udcXX), so it keeps the real bytes.
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors=ESCAPE)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except SimsearchError as exc:  # a database error too (errors.DatabaseError)
            click.echo(f"Error: {explain(exc, self.invoked)}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo(
                "Interrupted; everything done before it is kept: run the same command again "
                "to continue where it stopped.",
                err=True,
            )
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
# The output contract, the same for every command: --json prints JSON Lines (one object
# per line: per row where a command prints rows, else one summary object); --csv, where a
# command prints rows, prints them as CSV with a header line. Notices go to stderr.
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON Lines for scripts (one object a line)."
)
csv_option = click.option(
    "--csv", "as_csv", is_flag=True, help="Print the rows as CSV with a header line."
)


def check_output(as_json: bool, as_csv: bool) -> None:
    """Refuse --json and --csv together (a UsageError, exit 2)."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv are two formats of one output: give one")


def csv_table(header: list[str]):
    """A CSV writer on stdout with `header` written: rows go out as they are written."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(header)
    return out


def csv_rows(header: list[str], rows) -> None:
    """Print `rows` (sequences of cells) under `header` as CSV on stdout."""
    csv_table(header).writerows(rows)


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
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where the model runs; auto uses CUDA when there is one.",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    envvar="SIMSEARCH_PRECISION",
    show_default=True,
    show_envvar=True,
    help="Arithmetic of the model: auto = fp16 on CUDA, bf16 on CPUs with native bf16, "
    "else fp32; int8 = quantised linear layers (CPU).",
)
backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    envvar="SIMSEARCH_BACKEND",
    show_envvar=True,
    help="Runtime of the model. auto (a new index's default): the faster faithful one here: "
    "torch bf16 on CPUs with AMX and on GPUs; else ONNX Runtime fp32 when onnxruntime and "
    "the exporter are installed (the model is exported once, checked against PyTorch and "
    "cached), else torch. onnx: ONNX Runtime, --model an export-model folder or a model to "
    "export.  [default: the index's, or auto]",
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
      simsearch dedup --html dups.html           # near-duplicates, to look at first
      simsearch cluster -k auto                  # groups of similar images

    Without hub access, point --model (or SIMSEARCH_MODEL) at a folder written by
    transformers' save_pretrained.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


def _report_written(obj, path: Path, shown: int) -> None:
    if not obj["quiet"]:
        click.echo(f"wrote {path} ({shown} images)", err=True)


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


# -- training commands (finetune, distill) -------------------------------------------------


def typed(ctx: click.Context, name: str) -> bool:
    """Return True when option `name` was typed on the command line."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def resumed_settings(ctx: click.Context, settings: dict, saved: dict) -> dict:
    """The settings of a resumed run: what the command line typed, else the interrupted
    run's own (`saved`)."""
    return {**saved, **{name: value for name, value in settings.items() if typed(ctx, name)}}


def training_bars(quiet: bool):
    """The progress-bar factory a training run takes (tqdm on stderr, gone when done)."""
    from tqdm import tqdm

    def progress(**kwargs):
        return tqdm(file=sys.stderr, leave=False, disable=quiet, dynamic_ncols=True, **kwargs)

    return progress
