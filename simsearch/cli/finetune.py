"""`simsearch finetune`: train a classification head (and the last blocks) on class folders."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import click

from simsearch.cli.common import (
    cli,
    device_option,
    json_option,
    resumed_settings,
    training_bars,
    typed,
)
from simsearch.cli.hints import explain
from simsearch.cli.render import epoch_line, finetune_line
from simsearch.errors import TrainingInterrupted
from simsearch.train.finetune import FinetuneConfig
from simsearch.train.transfer import DEFAULT_TRAINABLE_BLOCKS
from simsearch.train.transfer import PRECISIONS as TRAINING_PRECISIONS

log = logging.getLogger("simsearch")

# Command-line options that are FinetuneConfig fields of the same name.
CONFIG_OPTIONS = (
    "model",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "warmup_ratio",
    "freeze_layers",
    "gradient_checkpointing",
    "precision",
    "val_split",
    "val_dir",
    "patience",
    "seed",
)


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the fine-tuned model (new or empty, unless --resume).",
)
@click.option(
    "--model",
    default=FinetuneConfig.model,
    envvar="SIMSEARCH_MODEL",
    show_default=True,
    show_envvar=True,
    help="Backbone to start from: hub id or local folder (a new head is put on it).",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help=f"Share of each class held out for validation.  [default: {FinetuneConfig.val_split}]",
)
@click.option(
    "--val-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Validation images in a folder laid out like DATA_DIR (instead of --val-split).",
)
@click.option(
    "--freeze-layers",
    type=click.IntRange(min=0),
    default=None,
    help="Freeze the embeddings and the first N blocks.  "
    f"[default: all but the last {DEFAULT_TRAINABLE_BLOCKS}]",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass: less memory, ~30% more time.",
)
@click.option(
    "--precision",
    type=click.Choice(TRAINING_PRECISIONS),
    default=FinetuneConfig.precision,
    show_default=True,
    help="Arithmetic: auto = bf16 where the hardware has it, fp16 (with loss scaling) on "
    "older GPUs, else fp32. fp16 is CUDA only.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=FinetuneConfig.lr,
    show_default=True,
    help=f"Peak learning rate of the blocks (the new head: {FinetuneConfig.head_lr_scale:g}x).",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Optimiser steps of linear warm-up (instead of --warmup-ratio).",
)
@click.option(
    "--warmup-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    default=FinetuneConfig.warmup_ratio,
    show_default=True,
    help="Share of the steps spent warming up; then a cosine decay to 0.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=FinetuneConfig.epochs,
    show_default=True,
    help="Passes over the training images.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=FinetuneConfig.batch_size,
    show_default=True,
    help="Images per forward pass.",
)
@click.option(
    "--grad-accum",
    type=click.IntRange(min=1),
    default=FinetuneConfig.grad_accum,
    show_default=True,
    help="Forward passes per optimiser step (effective batch: batch size x this).",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=FinetuneConfig.patience,
    show_default=True,
    help="Stop after this many epochs without better validation.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=FinetuneConfig.seed,
    show_default=True,
    help="Seed of the head, the split, the data order and the augmentation.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run in OUTPUT; options left out are the run's own.",
)
@device_option
@json_option
@click.pass_context
def finetune(ctx, data_dir, output, resume, device, as_json, **options):
    """Fine-tune a backbone on DATA_DIR, one sub-folder of images per class.

    Trains a new classification head and the backbone's last blocks, keeps the epoch with
    the best validation accuracy, and saves it in OUTPUT: a model folder that `simsearch
    label` names classes with and `simsearch index` embeds with. Unreadable images are
    skipped with a warning. Ctrl-C stops after the current step and saves; --resume goes on.

    \b
    Examples:
      simsearch finetune photos-by-kind/ --output models/kinds --model ./models/vit-base
      simsearch label new.jpg --model models/kinds
      simsearch index ~/Pictures --index indexes/kinds --model models/kinds
    """
    from simsearch.train.finetune import finetune, read_checkpoint_config

    if options["val_dir"] is not None and options["val_split"] is not None:
        raise click.UsageError("give --val-split or --val-dir, not both")
    if typed(ctx, "warmup_steps") and typed(ctx, "warmup_ratio"):
        raise click.UsageError("give --warmup-steps or --warmup-ratio, not both")
    if options["val_split"] is None:
        options["val_split"] = FinetuneConfig.val_split
    if options["val_dir"] is not None:
        options["val_dir"] = str(options["val_dir"])
    settings = {name: options[name] for name in CONFIG_OPTIONS}
    if resume:  # what the command line does not say, the interrupted run decides
        settings = resumed_settings(ctx, settings, asdict(read_checkpoint_config(output)))
    config = FinetuneConfig(**settings)

    quiet = ctx.obj["quiet"]

    def on_epoch(record):
        if not quiet:
            click.echo(epoch_line(record, config.epochs), err=True)

    try:
        result = finetune(
            data_dir,
            output,
            config,
            resume=resume,
            device=device,
            progress=training_bars(quiet),
            on_epoch=on_epoch,
        )
    except TrainingInterrupted as exc:
        click.echo(f"Interrupted: {explain(exc, 'finetune')}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(asdict(result)))
        return
    click.echo(f"fine-tuned model saved in {result.output}")
    click.echo(finetune_line(result))
    click.echo(f"classes: {', '.join(result.classes)}")
    if result.peak_memory_bytes is not None:
        click.echo(
            f"peak memory: {result.peak_memory_bytes / 2**30:.2f} GiB ({result.peak_memory_kind})"
        )
    click.echo("use it:")
    click.echo(f"  simsearch label IMAGE --model {result.output}")
    click.echo(f"  simsearch index DIR --index INDEX --model {result.output}")
