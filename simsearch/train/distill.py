"""Distillation: a small, fast student trained to reproduce an index's own stored vectors
from its images, saved as a model folder that `index` and `search` take for that index.

The targets are free: the index holds the teacher's vector of every image it has, so no
labels and no teacher forward pass are needed. The loss is the cosine distance of each
student vector to its target, plus `similarity_weight` times the mean squared difference
between the student's in-batch similarity matrix and the targets' (the neighbour
similarities are what search ranks by), plus, with `index_weight`, a KL divergence between
how the student's vector and its target rank the training images' stored vectors. A
seeded share of the images is held out; at the end the student embeds them and its
agreement with the teacher is measured as recall@10 of student-embedded queries against
teacher-embedded ones over the whole index.

    OUTPUT/checkpoints/last.pt   while training: everything --resume needs, written every
                                 `checkpoint_every` steps and after every epoch, atomically
    OUTPUT/                      once finished: the student (models/student.py)

Runs like `finetune`: progress bars, Ctrl-C stops after the current step and saves,
--resume continues with the same settings (others are refused), mixed precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from simsearch._version import __version__
from simsearch.config import DEFAULT_WORKERS
from simsearch.errors import DistillError, TrainingInterrupted
from simsearch.media.preprocess import Preprocessing
from simsearch.models.embed import pick_device
from simsearch.records import DistillResult
from simsearch.train.checkpoints import (
    CHECKPOINTS,
    LAST,
    UNFIT,
    check_output_free,
    check_resume_point,
    checkpoint_error,
    checkpoint_path,
    load_optimizer,
    read_checkpoint,
    save_atomic,
    saved_settings,
    unfit_reason,
)
from simsearch.train.distill_data import DistillData, read_index_data, read_index_manifest
from simsearch.train.distill_setup import (
    DISTILL,
    DISTILL_CHECKPOINT_FORMAT,
    find_teacher,
    make_student,
    read_config,
    speeds,
    student_side,
    teacher_record,
)
from simsearch.train.distill_student import (
    INITS,
    StudentNet,
    agreement,
    embed_all,
    publish_student,
    vit_flops,
)
from simsearch.train.loop import NoBar, StopOnCtrlC, learning_rate
from simsearch.train.transfer import (
    PRECISIONS,
    enable_gradient_checkpointing,
    pick_training_precision,
)

log = logging.getLogger(__name__)

# Default peak learning rates. A random student: 5e-4, the usual rate for a small ViT trained
# from scratch (DeiT-Ti/S at batch 512 scaled down). A thinned one: its weights are trained
# already and only have to close the gap left by the blocks it lacks, so a fine-tuning rate.
# One that keeps every block up to the index's layer (the default: it differs from its
# teacher only in the smaller images it sees) starts nearer still and is hurt by 1e-4: on
# DINOv2-S's 1,500-image benchmark at 112 px, 12 epochs, recall@10 0.546 at 3e-5 against
# 0.497 at 1e-4 (docs/benchmarks.md).
LR_RANDOM = 5e-4
LR_TEACHER = 1e-4
LR_WHOLE = 3e-5

# The index loss ranks each batch against at most this many training images' stored vectors
# (a seeded choice when there are more): they stay on the device, and each step makes a
# batch x anchors matrix, so memory is bounded whatever the index's size (16,384 x 1,024-dim
# fp32 is 64 MB; a million would be 4 GB).
INDEX_LOSS_ANCHORS = 16_384


@dataclass(frozen=True)
class DistillConfig:
    """How to distill; saved with every checkpoint and in OUTPUT/simsearch_student.json."""

    # how the student starts: "teacher", a thinned copy of the teacher (its embeddings,
    # `layers` of its blocks evenly spaced and ending at the index's layer, its final norm;
    # the projection the identity); "random", a ViT of layers x hidden x heads from random
    # weights. None: "teacher" where the teacher's architecture allows it and no other
    # width, heads or patch size is asked for, else "random"
    init: str | None = None
    # the student's blocks; None: a thinned student at a smaller image size takes all the
    # teacher's blocks up to the index's layer, one at the teacher's size a quarter of them
    # (THIN_SHARE); a random one distill_student.default_size (about a fifth of its FLOPs)
    layers: int | None = None
    # the side in px of the square images the student sees (a multiple of its patch size);
    # the student's preprocessing is the index's scaled to it. FLOPs fall with the square of
    # the side: at half the teacher's side a student with all its blocks costs about a
    # quarter (DINOv2-S, 12 epochs: recall@10 0.50-0.55 where 3 of its 12 blocks at full
    # size reach 0.22; docs/benchmarks.md). None: half the teacher's side (rounded down to
    # its patch size) for a thinned student given no --layers, else the teacher's side
    image_size: int | None = None
    # width and attention heads of a random student; a thinned one has the teacher's
    hidden: int | None = None
    heads: int | None = None
    # the MLP's width as a multiple of a random student's (4: ViT's own)
    mlp_ratio: float = 4.0
    # a random student's patch size; None: the teacher's (its input size is the index's)
    patch_size: int | None = None
    # passes over the training images: a random student needs many; a thinned one starts
    # nearer its teacher and still gains from more (DINOv2-S, 2 blocks: recall@10 0.07 at
    # 3 epochs, 0.22 at 12; docs/benchmarks.md)
    epochs: int = 30
    # images per step; the neighbour loss compares every pair in a batch, so bigger is better
    batch_size: int = 64
    # AdamW's peak learning rate, with a warm-up and a cosine decay; None: LR_RANDOM for a
    # random student, LR_WHOLE for a thinned one that keeps all the teacher's blocks up to
    # the index's layer, LR_TEACHER for one that drops some (peak_lr)
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    # weight of the neighbour-similarity loss beside the cosine loss
    similarity_weight: float = 1.0
    # weight of the index loss: the KL divergence from how the image's stored vector ranks
    # the other training images' stored vectors (a softmax of the cosines over
    # `index_temperature`) to how the student's vector ranks them: search's own task, a
    # student query against the teacher's vectors, over the whole training set each step.
    # Off by default: at 1.0 it lowered DINOv2-S's benchmark recall@10 (0.511 against
    # 0.546, 1,500 images, 12 epochs; docs/benchmarks.md)
    index_weight: float = 0.0
    index_temperature: float = 0.05
    # share of the images held out to measure agreement on (never trained on)
    held_out: float = 0.1
    # train on at most this many of the index's images (a seeded choice); None: all
    max_images: int | None = None
    # a random horizontal flip of the training images; off by default because the target
    # is the teacher's vector of the unflipped image
    augment: bool = False
    # std of Gaussian noise added to the training images' normalised pixels (a fresh draw
    # each step; the targets stay the clean images' vectors), against a student memorising
    # a small collection. Off by default: on DINOv2-S's 1,500-image benchmark 0.1 did not
    # help (recall@10 0.537 against 0.546 without, 12 epochs; docs/benchmarks.md)
    noise: float = 0.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # optimiser steps between checkpoints (besides one after every epoch)
    checkpoint_every: int = 200
    seed: int = 0
    workers: int = field(default=DEFAULT_WORKERS, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.layers is None or self.layers >= 1, "layers must be at least 1"),
            (self.hidden is None or self.hidden >= 1, "hidden must be at least 1"),
            (self.heads is None or self.heads >= 1, "heads must be at least 1"),
            (self.mlp_ratio > 0, "mlp ratio must be positive"),
            (self.patch_size is None or self.patch_size >= 1, "patch size must be >= 1"),
            (self.image_size is None or self.image_size >= 1, "image size must be >= 1"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.seed >= 0, "seed must not be negative"),
            (self.batch_size >= 2, "batch size must be at least 2 (the neighbour loss)"),
            (self.init in (None, *INITS), f"init must be one of {', '.join(INITS)}"),
            (self.lr is None or self.lr > 0, "learning rate must be positive"),
            (self.weight_decay >= 0, "weight decay must not be negative"),
            (0 <= self.warmup_ratio < 1, "warmup ratio must be in [0, 1)"),
            (self.grad_clip >= 0, "grad clip must not be negative"),
            (self.similarity_weight >= 0, "similarity weight must not be negative"),
            (self.index_weight >= 0, "index weight must not be negative"),
            (self.index_temperature >= 1e-3, "index temperature must be at least 0.001"),
            (self.noise >= 0, "noise must not be negative"),
            (0 < self.held_out < 1, "held out must be between 0 and 1 (exclusive)"),
            (self.max_images is None or self.max_images >= 1, "max images must be >= 1"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.checkpoint_every >= 1, "checkpoint every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise DistillError(message)

    def differences(self, other: DistillConfig) -> list[str]:
        """Return 'name: mine vs theirs' for each setting that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name != "workers" and getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass
class DistillState:
    """Where training stands: what last.pt holds besides the weights and optimiser."""

    epoch: int = 0
    batch: int = 0  # steps done in the current epoch
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0  # wall time of the earlier runs (before --resume)
    history: list = field(default_factory=list)  # per epoch: loss, lr, seconds


def distill(
    index: str | os.PathLike,
    output: str | os.PathLike,
    config: DistillConfig | None = None,
    *,
    teacher: str | os.PathLike | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DistillResult:
    """Train a student of `index`'s model on its images and vectors; save it at `output`.

    `teacher`: where the index's model is, when not where its manifest says (it is read for
    its preprocessor config, its size and its speed, never run on the training images).
    `resume` continues the interrupted run in `output`; `config` None then means the
    checkpoint's own, and one that differs is an error. `progress`: a tqdm-like factory;
    `on_epoch` gets each epoch's record, `on_step` each step's number. Ctrl-C stops after the
    current step, saves, and raises TrainingInterrupted.
    """
    import torch

    started = time.monotonic()
    index, output = Path(index), Path(output)
    checkpoint = read_checkpoint(output, DISTILL) if resume else None
    last = checkpoint_path(output)
    if checkpoint is not None:
        saved = checkpoint_config(checkpoint, last)
        saved_state = _checked_checkpoint(checkpoint, last)
        config = config or saved
    config = config or DistillConfig()
    if checkpoint is None:
        check_output_free(output, DISTILL)
    else:
        diffs = saved.differences(config)
        if diffs:
            raise DistillError(
                f"cannot resume {output} with other settings (checkpoint vs now: "
                f"{'; '.join(diffs)}); resume with the same settings, or start in a new "
                "output folder",
                param="output",
            )

    manifest = read_index_manifest(index)
    teacher_folder = find_teacher(teacher, manifest)
    teacher_config = read_config(teacher_folder)
    teacher_side = Preprocessing.from_dict(manifest.preprocessing).input_side()
    side = student_side(config, teacher_config, teacher_side)
    bar = progress(total=0, desc="reading images") if progress else NoBar()
    try:
        data = read_index_data(
            index,
            held_out=config.held_out,
            seed=config.seed,
            max_images=config.max_images,
            workers=config.workers,
            image_size=side,
            progress=bar,
        )
    finally:
        bar.close()
    if checkpoint is not None and checkpoint["fingerprint"] != data.fingerprint:
        raise DistillError(
            f"cannot resume {output}: the index's images or vectors changed since it started; "
            "start in a new output folder",
            param="output",
        )
    manifest = data.manifest
    height, width = data.pixels.shape[2:]

    device = pick_device(device)
    precision = pick_training_precision(config.precision, device)
    torch.manual_seed(config.seed)
    student = make_student(
        config, teacher_folder, teacher_config, manifest, (height, width), teacher_side
    )
    backbone, projection, size, patch = (
        student.backbone,
        student.projection,
        student.size,
        student.patch,
    )
    if checkpoint is not None:
        # the rate it started at, though the defaults changed since: a checkpoint from before
        # the rate was saved ran at the default then, LR_TEACHER for any thinned student
        old_default = LR_TEACHER if student.init == "teacher" else LR_RANDOM
        lr = checkpoint.get("lr") or config.lr or old_default
    else:
        lr = peak_lr(config, student.init, student.teacher_blocks)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    net = StudentNet(backbone.to(device), projection.to(device))
    optimizer = _optimizer(net, config, lr)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    state = DistillState()
    if checkpoint is not None:
        try:
            net.modules.load_state_dict(checkpoint["model"])
            if scaler.is_enabled() and checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
            torch.set_rng_state(checkpoint["rng"])
        except UNFIT as exc:
            raise checkpoint_error(
                DISTILL, last, unfit_reason(exc), "does not fit this student"
            ) from None
        load_optimizer(optimizer, checkpoint["optimizer"], DISTILL, last)
        state = saved_state

    run = _Run(config, lr, data, net, optimizer, scaler, device, precision, output, state, started)
    if checkpoint is not None:
        per_epoch = run.steps_per_epoch
        check_resume_point(state, config.epochs, per_epoch, DISTILL, last)
        if state.step != state.epoch * per_epoch + state.batch:
            raise checkpoint_error(
                DISTILL,
                last,
                f"its training state: step {state.step} is not where epoch {state.epoch} "
                f"and batch {state.batch} put it",
            )
    run.train(progress, on_epoch, on_step)

    # Measure: the held-out images' student vectors as queries against the teacher's.
    held = data.held_out
    student_vectors = embed_all(net, data.pixels[held], device)
    row_of = np.searchsorted(data.all_ids, data.ids)
    measured = agreement(student_vectors, data.targets[held], held, data.all_vectors, row_of)
    teacher_hw = (teacher_side, teacher_side) if teacher_side else (height, width)
    student_flops = vit_flops(backbone.config.to_dict(), height, width)
    teacher_flops = vit_flops(teacher_config, *teacher_hw) if teacher_config else None
    speed = speeds(net, teacher_folder, manifest, data.pixels[held], device, teacher_hw)
    flops_ratio = (
        round(student_flops / teacher_flops, 4) if student_flops and teacher_flops else None
    )
    record = {
        "simsearch_version": __version__,
        "teacher": teacher_record(manifest),
        "student": {
            "architecture": str(getattr(backbone.config, "model_type", "vit")),
            "init": student.init,
            # the teacher's blocks (1-based) a thinned student started from, in order
            "teacher_blocks": student.teacher_blocks,
            "hidden_size": size["hidden"],
            "layers": size["layers"],
            "heads": size["heads"],
            "patch_size": patch,
            # the side of the images it sees; its preprocessing is the index's scaled to it
            "image_size": int(height),
            "gflops": None if student_flops is None else round(student_flops / 1e9, 4),
        },
        "teacher_gflops": None if teacher_flops is None else round(teacher_flops / 1e9, 4),
        "flops_ratio": flops_ratio,
        "config": asdict(config),
        "lr": lr,
        "index": str(index.resolve()),
        "agreement": measured,
        "speed": speed,
        "training": {
            "train_images": len(data.train),
            "held_out_images": len(held),
            "skipped": data.skipped,
            "steps": run.state.step,
            "epochs": run.state.epoch,
            "device": device,
            "precision": precision,
            "seconds": round(run.elapsed(), 1),
            "history": run.state.history,
        },
    }
    publish_student(net, teacher_folder, output, output / CHECKPOINTS / "publish", record)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    return DistillResult(
        output=str(output.resolve()),
        teacher=manifest.model,
        recall_at_10=measured["recall_at_10"],
        mean_cosine=measured["mean_cosine"],
        held_out_images=len(held),
        train_images=len(data.train),
        skipped=data.skipped,
        layers=size["layers"],
        hidden=size["hidden"],
        heads=size["heads"],
        flops_ratio=flops_ratio,
        student_images_per_second=speed["student_images_per_second"],
        teacher_images_per_second=speed["teacher_images_per_second"],
        epochs=run.state.epoch,
        steps=run.state.step,
        device=device,
        precision=precision,
        seconds=round(run.elapsed(), 1),
        history=tuple(run.state.history),
        init=student.init,
        teacher_blocks=tuple(student.teacher_blocks or ()),
        image_size=int(height),
        teacher_image_size=teacher_hw[0],
    )


@dataclass
class _Run:
    """One distillation in progress: the student, what it learns from, where it stands."""

    config: DistillConfig
    lr: float  # the peak learning rate: config.lr, or the default for the student's init
    data: DistillData
    net: StudentNet
    optimizer: Any
    scaler: Any  # torch.amp.GradScaler, enabled for fp16 only
    device: str
    precision: str
    output: Path
    state: DistillState
    started: float
    anchors: Any = None  # training images' stored vectors, on the device (index loss)
    anchor_row: Any = None  # an image's position -> its row in anchors

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.config.batch_size)

    def elapsed(self) -> float:
        return self.state.seconds + time.monotonic() - self.started

    def autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device, dtype=dtype)

    def train(self, progress, on_epoch, on_step) -> None:
        config, state = self.config, self.state
        total = self.steps_per_epoch * config.epochs
        warmup = round(config.warmup_ratio * total)
        with StopOnCtrlC() as stop:
            while state.epoch < config.epochs:
                epoch_start = time.monotonic()
                order = self.data.epoch_order(state.epoch, config.seed)
                batches = [
                    order[i : i + config.batch_size]
                    for i in range(0, len(order), config.batch_size)
                ]
                desc = f"epoch {state.epoch + 1}/{config.epochs}"
                bar = (
                    progress(total=len(batches), initial=state.batch, desc=desc)
                    if progress
                    else NoBar()
                )
                lr = 0.0
                while state.batch < len(batches):
                    lr = learning_rate(state.step, total, warmup, self.lr)
                    self.step(batches[state.batch], lr)
                    bar.update(1)
                    bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}", lr=f"{lr:.2e}")
                    if on_step is not None:
                        on_step(state.step)
                    if stop.requested:
                        self.save()
                        bar.close()
                        raise self.interrupted()
                    if state.step % config.checkpoint_every == 0:
                        self.save()
                bar.close()
                record = {
                    "epoch": state.epoch + 1,
                    "step": state.step,
                    "loss": round(state.loss_sum / max(state.loss_count, 1), 6),
                    "lr": lr,
                    "seconds": round(time.monotonic() - epoch_start, 2),
                }
                state.history.append(record)
                state.epoch, state.batch, state.loss_sum, state.loss_count = (
                    state.epoch + 1,
                    0,
                    0.0,
                    0,
                )
                self.save()
                if on_epoch is not None:
                    on_epoch(record)
                if stop.requested and state.epoch < config.epochs:
                    raise self.interrupted()

    def step(self, positions: np.ndarray, lr: float) -> None:
        """One optimiser step on the images at `positions`."""
        import torch

        config, state = self.config, self.state
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pixels = self.data.pixels[positions].astype(np.float32)
        rng = np.random.default_rng([config.seed, state.epoch, state.batch])
        if config.augment:
            flip = rng.random(len(pixels)) < 0.5
            pixels[flip] = pixels[flip][..., ::-1]
        if config.noise:
            pixels += config.noise * rng.standard_normal(pixels.shape, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        target = torch.from_numpy(self.data.targets[positions]).to(self.device)
        with self.autocast():
            vectors = self.net(x)
        vectors = vectors.float()
        loss = distill_loss(vectors, target, config.similarity_weight)
        if config.index_weight:
            loss = loss + config.index_weight * self.index_loss(vectors, target, positions)
        if not torch.isfinite(loss):
            raise DistillError(
                f"training diverged: the loss is {loss.item()} at step {state.step + 1}; run "
                "again with a lower learning rate",
                param="lr",
            )
        self.scaler.scale(loss).backward()
        if config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.modules.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.loss_sum += loss.item() * len(positions)
        state.loss_count += len(positions)
        state.step += 1
        state.batch += 1

    def index_loss(self, student, target, positions: np.ndarray):
        """The KL divergence from the targets' softmax over the training images' stored
        vectors to the student vectors' (cosines over index_temperature; each image's own
        vector left out)."""
        import torch

        if self.anchors is None:
            train = np.asarray(self.data.train)
            if len(train) > INDEX_LOSS_ANCHORS:  # the same choice on every resume
                rng = np.random.default_rng([self.config.seed, len(train)])
                train = np.sort(rng.choice(train, INDEX_LOSS_ANCHORS, replace=False))
            self.anchors = torch.from_numpy(self.data.targets[train]).to(self.device)
            self.anchor_row = np.full(len(self.data.ids), -1, dtype=np.int64)
            self.anchor_row[train] = np.arange(len(train))
        scale = 1.0 / self.config.index_temperature
        rows = self.anchor_row[positions]
        has = np.flatnonzero(rows >= 0)  # a held-out image has no vector among the anchors
        mask = torch.zeros(len(positions), len(self.anchors), dtype=torch.bool, device=self.device)
        mask[torch.from_numpy(has).to(self.device), torch.from_numpy(rows[has]).to(self.device)] = (
            True
        )
        teacher = (target @ self.anchors.T * scale).masked_fill(mask, float("-inf"))
        mine = (student @ self.anchors.T * scale).masked_fill(mask, float("-inf"))
        p = torch.softmax(teacher, dim=-1)
        kl = p * (torch.log_softmax(teacher, dim=-1) - torch.log_softmax(mine, dim=-1))
        return kl.masked_fill(mask, 0.0).sum(dim=-1).mean()

    def save(self) -> None:
        """Write last.pt: everything --resume needs to continue from this step."""
        import torch

        save_atomic(
            {
                "format": DISTILL_CHECKPOINT_FORMAT,
                "kind": "distill",
                "config": asdict(self.config),
                "lr": self.lr,
                "fingerprint": self.data.fingerprint,
                "model": {k: v.detach().cpu() for k, v in self.net.modules.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": torch.get_rng_state(),
                "state": {**asdict(self.state), "seconds": self.elapsed()},
            },
            self.output / CHECKPOINTS / LAST,
        )

    def interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"interrupted at step {self.state.step} (epoch {self.state.epoch + 1}); progress "
            f"is saved in {self.output / CHECKPOINTS}",
            path=self.output,
            fix="resume",
        )


def distill_loss(student, target, similarity_weight: float):
    """Mean (1 - cosine) to the targets, plus `similarity_weight` times the mean squared
    difference of the in-batch cosine similarity matrices (both sets are unit vectors)."""
    import torch

    cosine = 1.0 - (student * target).sum(dim=-1).mean()
    if not similarity_weight:
        return cosine
    neighbours = torch.nn.functional.mse_loss(student @ student.T, target @ target.T)
    return cosine + similarity_weight * neighbours


def _optimizer(net: StudentNet, config: DistillConfig, lr: float):
    import torch

    decay: list = []
    rest: list = []
    for param in net.modules.parameters():
        (decay if param.ndim >= 2 else rest).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=lr,
    )


def peak_lr(config: DistillConfig, init: str, teacher_blocks: list[int] | None = None) -> float:
    """The peak learning rate a new student trains at: config.lr, else by how it starts:
    LR_RANDOM from random weights; thinned from the teacher (`teacher_blocks`, 1-based),
    LR_WHOLE when it keeps every block up to the index's layer, else LR_TEACHER."""
    if config.lr:
        return config.lr
    if init != "teacher":
        return LR_RANDOM
    blocks = list(teacher_blocks or ())
    return LR_WHOLE if blocks and blocks == list(range(1, len(blocks) + 1)) else LR_TEACHER


def read_distill_config(output: str | os.PathLike) -> DistillConfig:
    """Return the DistillConfig of the interrupted distillation in `output`."""
    return checkpoint_config(read_checkpoint(Path(output), DISTILL), checkpoint_path(output))


def checkpoint_config(checkpoint: dict, path: Path | str = LAST) -> DistillConfig:
    """The DistillConfig a checkpoint was trained with; one written before a setting existed
    ran without it (noise, index loss: none), whatever that setting's default is now.
    DistillError when its settings are not DistillConfig's (an edited or damaged checkpoint
    at `path`)."""
    saved = checkpoint.get("config")
    if isinstance(saved, dict):
        saved = {"noise": 0.0, "index_weight": 0.0, **saved}
    return saved_settings(DistillConfig, saved, DISTILL, Path(path))


def _fits_lr(lr: object, config_lr: object) -> bool:
    """Whether a checkpoint's saved rate is the one its settings name or, naming none, a
    default: a finite number in (0, 1]."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        return False
    return lr == config_lr if config_lr is not None else 0 < lr <= 1


def _checked_checkpoint(checkpoint: dict, path: Path) -> DistillState:
    """Check that the checkpoint at `path` holds what a resume reads, of the right kinds,
    before anything is loaded from it; return its DistillState. DistillError names what is
    wrong: a checkpoint is a file, and may have been edited or damaged."""
    import torch

    kinds = {
        "fingerprint": str,
        "model": dict,
        "optimizer": dict,
        "scaler": dict,
        "rng": torch.Tensor,
    }
    for key, kind in kinds.items():
        if not isinstance(checkpoint.get(key), kind):
            got = type(checkpoint.get(key)).__name__ if key in checkpoint else "nothing"
            raise checkpoint_error(DISTILL, path, f"its {key} is {got}, not a {kind.__name__}")
    lr = checkpoint.get("lr")
    config_lr = checkpoint["config"].get("lr")
    if lr is not None and not _fits_lr(lr, config_lr):
        raise checkpoint_error(
            DISTILL,
            path,
            f"its learning rate is {lr!r}, not the rate its settings name ({config_lr!r}) "
            "or a default in (0, 1]",
        )
    return saved_settings(DistillState, checkpoint.get("state"), DISTILL, path, "training state")
