"""`simsearch distill`: train a small, fast student into an index's own vector space."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from simsearch.cli.common import (
    cli,
    device_option,
    index_option,
    json_option,
    resumed_settings,
    training_bars,
)
from simsearch.cli.hints import explain
from simsearch.errors import TrainingInterrupted
from simsearch.train.distill import LR_RANDOM, LR_TEACHER, LR_WHOLE, DistillConfig
from simsearch.train.distill_student import INITS
from simsearch.train.transfer import PRECISIONS as TRAINING_PRECISIONS

# Command-line options that are DistillConfig fields of the same name.
CONFIG_OPTIONS = (
    "init",
    "layers",
    "hidden",
    "heads",
    "patch_size",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "similarity_weight",
    "index_weight",
    "index_temperature",
    "held_out",
    "max_images",
    "augment",
    "noise",
    "precision",
    "gradient_checkpointing",
    "checkpoint_every",
    "seed",
)


@cli.command()
@index_option
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the student (new or empty, unless --resume).",
)
@click.option(
    "--teacher",
    default=None,
    help="Where the index's model is, when not where its manifest says (checked by its "
    "weights; read for its preprocessing, size and speed, never run on the images).",
)
@click.option(
    "--init",
    type=click.Choice(INITS),
    default=None,
    help="How the student starts: teacher = a thinned copy of the teacher (its width, "
    "--layers of its blocks evenly spaced, ending at the index's layer); random = a ViT of "
    "--layers x --hidden x --heads from random weights.  [default: teacher where its "
    "architecture allows and no other width, heads or patch size is asked for]",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Student blocks.  [default: thinned, all of the teacher's up to the index's layer "
    "at a smaller --image-size, a quarter at the teacher's; random, 3/4]",
)
@click.option(
    "--hidden",
    type=click.IntRange(min=8),
    default=None,
    help="A random student's width.  [default: half the teacher's]",
)
@click.option(
    "--heads",
    type=click.IntRange(min=1),
    default=None,
    help="A random student's attention heads.  [default: the teacher's head size kept]",
)
@click.option(
    "--patch-size",
    type=click.IntRange(min=1),
    default=None,
    help="A random student's patch size.  [default: the teacher's]",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Side in px of the images the student sees, a multiple of its patch size; its "
    "preprocessing is the index's scaled to it. Half the side is about a quarter of the "
    "FLOPs.  [default: half the teacher's for a thinned student given no --layers, else "
    "the teacher's]",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DistillConfig.epochs,
    show_default=True,
    help="Passes over the training images.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=DistillConfig.batch_size,
    show_default=True,
    help="Images per step (the neighbour loss compares every pair in a batch).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Peak learning rate (AdamW, warm-up, cosine decay).  [default: {LR_WHOLE:g} for a "
    f"student with all the teacher's blocks (the default), {LR_TEACHER:g} for one thinned "
    f"to fewer, {LR_RANDOM:g} random]",
)
@click.option(
    "--similarity-weight",
    type=click.FloatRange(min=0),
    default=DistillConfig.similarity_weight,
    show_default=True,
    help="Weight of the neighbour-similarity loss beside the cosine loss.",
)
@click.option(
    "--index-weight",
    type=click.FloatRange(min=0),
    default=DistillConfig.index_weight,
    show_default=True,
    help="Weight of the index loss: the student's vector should rank the training images' "
    "stored vectors as the image's own stored vector does (KL of the softmaxed cosines).",
)
@click.option(
    "--index-temperature",
    type=click.FloatRange(min=0.001),
    default=DistillConfig.index_temperature,
    show_default=True,
    help="Temperature of the index loss's softmax: lower looks at the nearest neighbours only.",
)
@click.option(
    "--held-out",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DistillConfig.held_out,
    show_default=True,
    help="Share of the images held out to measure agreement on.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=12),
    default=None,
    help="Read at most this many of the index's images (a seeded choice); their pixels are "
    "held in memory (~0.3 MB an image at 224 px).  [default: all that fit 4 GiB]",
)
@click.option(
    "--augment",
    is_flag=True,
    help="Flip training images at random (the targets are of the unflipped images).",
)
@click.option(
    "--noise",
    type=click.FloatRange(min=0),
    default=DistillConfig.noise,
    show_default=True,
    help="Std of Gaussian noise added to the training images' normalised pixels, drawn "
    "afresh each step (the targets stay the clean images' vectors), against a student "
    "memorising a small collection; 0: none.",
)
@click.option(
    "--precision",
    type=click.Choice(TRAINING_PRECISIONS),
    default=DistillConfig.precision,
    show_default=True,
    help="Arithmetic: auto = bf16 where the hardware has it, fp16 (with loss scaling) on "
    "older GPUs, else fp32.",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in the backward pass: less memory, more time.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=DistillConfig.checkpoint_every,
    show_default=True,
    help="Optimiser steps between checkpoints (and one after every epoch).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=DistillConfig.seed,
    show_default=True,
    help="Seed of the student's weights, the split, the data order and the flips.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run in OUTPUT; options left out are the run's own.",
)
@device_option
@json_option
@click.pass_context
def distill(ctx, index_path, output, teacher, resume, device, as_json, **options):
    """Train a small, fast student to embed into INDEX's own vector space.

    The student learns to reproduce the vectors the index already holds from its images (no
    labels, no teacher run), so its vectors search that index: images it adds and queries
    it embeds meet the teacher's vectors without re-indexing. At the end it is measured on
    held-out images (recall@10 of its queries against the teacher's, and its speed). Ctrl-C
    stops after the current step and saves; --resume goes on.

    \b
    Examples:
      simsearch distill --index indexes/photos --output models/photos-student
      simsearch index new-photos/ --index indexes/photos --model models/photos-student
      simsearch search query.jpg --index indexes/photos --model models/photos-student
      simsearch export-model --model models/photos-student -o student-onnx --int8
    """
    from simsearch.train.distill import distill, read_distill_config

    settings = {name: options[name] for name in CONFIG_OPTIONS}
    if resume:  # what the command line does not say, the interrupted run decides
        settings = resumed_settings(ctx, settings, asdict(read_distill_config(output)))
    config = DistillConfig(**settings)
    quiet = ctx.obj["quiet"]

    def on_epoch(record):
        if not quiet:
            click.echo(
                f"epoch {record['epoch']}/{config.epochs}: loss {record['loss']:.4f} "
                f"({record['seconds']:.1f} s)",
                err=True,
            )

    try:
        result = distill(
            index_path,
            output,
            config,
            teacher=teacher,
            resume=resume,
            device=device,
            progress=training_bars(quiet),
            on_epoch=on_epoch,
        )
    except TrainingInterrupted as exc:
        click.echo(f"Interrupted: {explain(exc, 'distill')}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(asdict(result)))
        return
    ratio = "" if result.flops_ratio is None else f", {result.flops_ratio:.2f}x the teacher's FLOPs"
    click.echo(f"student saved in {result.output}")
    start = (
        f"the teacher's blocks {', '.join(map(str, result.teacher_blocks))}"
        if result.init == "teacher"
        else "random weights"
    )
    side = (
        f", {result.image_size} px images (the teacher's: {result.teacher_image_size})"
        if result.image_size and result.image_size != result.teacher_image_size
        else ""
    )
    click.echo(
        f"student: {result.layers} blocks, {result.hidden} wide, {result.heads} heads{side}"
        f"{ratio}, from {start}; "
        f"{result.steps} steps in {result.seconds:.0f} s on {result.device} ({result.precision})"
    )
    click.echo(
        f"agreement on {result.held_out_images} held-out images: recall@10 "
        f"{result.recall_at_10:.3f} against the teacher, mean cosine {result.mean_cosine:.3f}"
    )
    teacher_speed = result.teacher_images_per_second
    speed = f"speed: {result.student_images_per_second:.1f} img/s"
    if teacher_speed:
        speed += (
            f" vs the teacher's {teacher_speed:.1f} "
            f"({result.student_images_per_second / teacher_speed:.1f}x)"
        )
    click.echo(speed)
    click.echo("use it for this index:")
    click.echo(f"  simsearch index DIR --index {index_path} --model {result.output}")
    click.echo(f"  simsearch search IMAGE --index {index_path} --model {result.output}")
