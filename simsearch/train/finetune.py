"""Fine-tuning: a classification head on a vision backbone, trained on folders of labelled
images and saved as a folder that `simsearch index` and `simsearch label` take as --model.

The shape follows nanoGPT: one config dataclass whose defaults say why they are what they
are, one loop that reads top to bottom, and checkpoints that carry their config and step.

    OUTPUT/                        the best epoch's model, once training has finished:
      config.json                  ...ForImageClassification, with id2label / label2id
      model.safetensors
      preprocessor_config.json     the base model's, unchanged
      simsearch_training.json      the FinetuneConfig, the base model, the per-epoch history
    OUTPUT/checkpoints/            while training (removed when it finishes):
      last.pt                      everything --resume needs, written after every epoch
      best.pt                      the trainable weights of the best epoch so far

Checkpoints hold only the weights that train (the frozen ones are the base model's, whose
weight hash is recorded and checked on resume): for ViT-L with two blocks training, about
0.3 GB (weights and AdamW moments) instead of 1.4 GB, and each is one file replaced atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any

from simsearch._version import __version__
from simsearch.config import DEFAULT_MODEL, DEFAULT_WORKERS
from simsearch.errors import FinetuneError, TrainingInterrupted
from simsearch.models.embed import pick_device
from simsearch.models.hub import load_preprocessing, resolve_model
from simsearch.models.weights import hash_weights
from simsearch.records import EpochRecord, FinetuneResult
from simsearch.train.checkpoints import (
    BEST,
    CHECKPOINT_FORMAT,
    CHECKPOINTS,
    LAST,
    check_output_free,
    publish,
    read_checkpoint,
    save_atomic,
    trainable_state,
)
from simsearch.train.dataset import TrainingData
from simsearch.train.transfer import (
    PRECISIONS,
    enable_gradient_checkpointing,
    freeze,
    load_for_training,
    make_optimizer,
    pick_training_precision,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; saved with every checkpoint and in OUTPUT/simsearch_training.json."""

    # the backbone to start from: hub id or save_pretrained folder; a bare backbone (no
    # head, the normal case) gets a new head, and so does a classifier with other classes
    model: str = DEFAULT_MODEL
    # passes over the training images; early stopping usually ends the run sooner
    epochs: int = 10
    # images per forward pass: 32 is the usual ViT fine-tuning batch and, with only the last
    # blocks training, fits ViT-L in a few GB
    batch_size: int = 32
    # forward passes per optimiser step: the effective batch is batch_size x grad_accum, for
    # when a big batch does not fit in memory
    grad_accum: int = 1
    # peak learning rate of the trainable blocks; 1e-4 moves pre-trained blocks without
    # erasing what they know (the usual range for AdamW fine-tuning is 1e-5 to 3e-4)
    lr: float = 1e-4
    # the new head's learning rate is lr times this: it starts from random and has further
    # to go than the pre-trained blocks
    head_lr_scale: float = 10.0
    # AdamW's decoupled weight decay on matrices (not on biases and norms), as in DeiT/MAE
    weight_decay: float = 0.05
    # share of the optimiser steps spent warming the learning rate up from 0: the new head's
    # first, large gradients must not wreck the pre-trained blocks
    warmup_ratio: float = 0.1
    # warm-up length in optimiser steps; when set, it replaces warmup_ratio
    warmup_steps: int | None = None
    # gradients are clipped to this global norm (0: no clipping), the usual ViT guard
    # against a bad batch's spike
    grad_clip: float = 1.0
    # embeddings and the first N blocks are frozen; None: all but the last
    # DEFAULT_TRAINABLE_BLOCKS; the number of blocks: only the head trains (a linear probe)
    freeze_layers: int | None = None
    # recompute block activations in the backward pass instead of keeping them: less
    # memory for ~30 % more time
    gradient_checkpointing: bool = False
    # arithmetic: "auto" = bf16 where the hardware has it (CUDA or a bf16 CPU), fp16 with
    # loss scaling on older GPUs, else fp32
    precision: str = "auto"
    # share of each class held out to measure the model, when val_dir is not given
    val_split: float = 0.2
    # a separate validation folder laid out like the data folder (then val_split is unused)
    val_dir: str | None = None
    # stop after this many epochs without a better validation result
    patience: int = 3
    # seeds the new head, the split, the data order and the augmentation: same seed, same run
    seed: int = 0
    # decoding threads for reading the images once at the start
    workers: int = field(default=DEFAULT_WORKERS, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.grad_accum >= 1, "grad accum must be at least 1"),
            (self.lr > 0, "learning rate must be positive"),
            (self.head_lr_scale > 0, "head lr scale must be positive"),
            (self.weight_decay >= 0, "weight decay must not be negative"),
            (0 <= self.warmup_ratio < 1, "warmup ratio must be in [0, 1)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup steps must be >= 0"),
            (self.grad_clip >= 0, "grad clip must not be negative"),
            (self.freeze_layers is None or self.freeze_layers >= 0, "freeze layers must be >= 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (0 < self.val_split < 1, "val split must be between 0 and 1 (exclusive)"),
            (self.patience >= 1, "patience must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)

    def differences(self, other: FinetuneConfig) -> list[str]:
        """Return 'name: mine vs theirs' for each setting that differs (the model aside)."""
        skip = {"model", "workers"}  # the model is compared by its weights; workers is free
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass
class _State:
    """Where training stands: what last.pt holds besides the weights and optimiser."""

    epoch: int = 0  # epochs completed (0-based index of the current one)
    batch: int = 0  # forward passes done in the current epoch (at an optimiser step)
    step: int = 0  # optimiser steps done
    loss_sum: float = 0.0  # the current epoch's training loss so far, summed over images
    loss_count: int = 0
    best_epoch: int = 0  # 1-based; 0: none yet
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best one
    stopped_early: bool = False
    seconds: float = 0.0  # wall time of the earlier runs of this fine-tune (before --resume)
    history: list = field(default_factory=list)  # EpochRecord dicts


def finetune(
    data_dir: str | os.PathLike,
    output: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `config.model` on the class folders of `data_dir`; return the best epoch's
    result, its model saved at `output`.

    `resume` continues the interrupted run in `output` (same step, schedule and data order);
    `config` None then means the checkpoint's own, and a config that differs is an error.
    Without `resume`, `output` must be new or empty. `progress`: a tqdm-like factory,
    called as progress(total=..., desc=..., initial=...); `on_epoch` gets each epoch's
    record, `on_step` each optimiser step's number. Ctrl-C stops after the current step,
    saves, and raises TrainingInterrupted; a second Ctrl-C stops at once.
    """
    import torch

    started = time.monotonic()
    output = Path(output)
    checkpoint = read_checkpoint(output) if resume else None
    if checkpoint is not None and config is None:
        config = FinetuneConfig(**checkpoint["config"])
    config = config or FinetuneConfig()
    if checkpoint is None:
        check_output_free(output)
    else:
        _check_same_config(config, FinetuneConfig(**checkpoint["config"]), output)

    folder, _ = resolve_model(config.model)
    base_sha256 = hash_weights(folder)
    preprocess = load_preprocessing(folder)
    bar = progress(total=0, desc="reading images") if progress else _NoBar()
    try:
        data = TrainingData(
            data_dir,
            preprocess,
            val_dir=config.val_dir,
            val_split=config.val_split,
            seed=config.seed,
            workers=config.workers,
            progress=bar,
        )
    finally:
        bar.close()
    if checkpoint is not None:
        _check_same_data(checkpoint, base_sha256, data, output)

    device = pick_device(device)
    precision = pick_training_precision(config.precision, device)
    torch.manual_seed(config.seed)  # the new head's initial weights
    model = load_for_training(folder, config.model, data.classes).to(device)
    frozen = freeze(model, config.freeze_layers)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.head_lr_scale)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    state = _State()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["trainable"], strict=False)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
        if device == "cuda" and checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        state = _State(**checkpoint["state"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def autocast():
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device, dtype=dtype)

    def save_last() -> None:
        elapsed = state.seconds + time.monotonic() - started
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "config": asdict(config),
                "base_weights_sha256": base_sha256,
                "classes": data.classes,
                "data_fingerprint": data.fingerprint,
                "trainable": trainable_state(trainable),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": torch.get_rng_state(),  # dropout, drop-path
                "cuda_rng": torch.cuda.get_rng_state_all() if device == "cuda" else [],
                "state": {**asdict(state), "seconds": elapsed},
            },
            output / CHECKPOINTS / LAST,
        )

    # One optimiser step per grad_accum forward passes; the last step of an epoch may take
    # fewer. The schedule is a function of the step alone, so a resumed run continues it.
    n_batches = math.ceil(len(data.train) / config.batch_size)
    total_steps = math.ceil(n_batches / config.grad_accum) * config.epochs
    warmup = (
        config.warmup_steps
        if config.warmup_steps is not None
        else round(config.warmup_ratio * total_steps)
    )
    model.train()
    with _StopOnCtrlC() as stop:
        while state.epoch < config.epochs and not state.stopped_early:
            epoch_start = time.monotonic()
            order = data.epoch_order(state.epoch, config.seed)
            batches = [
                order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)
            ]
            desc = f"epoch {state.epoch + 1}/{config.epochs}"
            bar = (
                progress(total=len(batches), initial=state.batch, desc=desc)
                if progress
                else _NoBar()
            )
            while state.batch < len(batches):
                group = batches[state.batch : state.batch + config.grad_accum]
                images_in_step = sum(len(b) for b in group)
                lr = learning_rate(state.step, total_steps, warmup, config.lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                for indices in group:
                    pixels, labels = data.train_batch(indices, state.epoch, config.seed)
                    x = torch.from_numpy(pixels).to(device)
                    y = torch.from_numpy(labels).to(device)
                    with autocast():
                        logits = model(pixel_values=x).logits
                    loss = torch.nn.functional.cross_entropy(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise _diverged(f"the training loss is {loss.item()}", state, lr)
                    # Weighted by images, so the step's gradient is the mean over its images.
                    scaler.scale(loss * (len(indices) / images_in_step)).backward()
                    state.loss_sum += loss.item() * len(indices)
                    state.loss_count += len(indices)
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable.values(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch += len(group)
                bar.update(len(group))
                bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.3f}", lr=f"{lr:.2e}")
                if on_step is not None:
                    on_step(state.step)
                if stop.requested:
                    save_last()
                    raise _interrupted(state, output)
            bar.close()

            val_loss, val_accuracy = evaluate(model, data, config.batch_size, device, autocast)
            if not math.isfinite(val_loss):
                raise _diverged(f"the validation loss is {val_loss}", state, lr)
            better = val_accuracy > state.best_accuracy or (
                val_accuracy == state.best_accuracy and val_loss < state.best_loss
            )
            record = EpochRecord(
                epoch=state.epoch + 1,
                step=state.step,
                train_loss=state.loss_sum / max(state.loss_count, 1),
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                lr=learning_rate(max(state.step - 1, 0), total_steps, warmup, config.lr),
                seconds=time.monotonic() - epoch_start,
                best=better,
            )
            state.history.append(asdict(record))
            if better:
                state.best_epoch, state.bad_epochs = record.epoch, 0
                state.best_accuracy, state.best_loss = val_accuracy, val_loss
                save_atomic(trainable_state(trainable), output / CHECKPOINTS / BEST)
            else:
                state.bad_epochs += 1
            state.epoch, state.batch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
            state.stopped_early = (
                state.bad_epochs >= config.patience and state.epoch < config.epochs
            )
            save_last()
            if on_epoch is not None:
                on_epoch(record)
            if stop.requested and state.epoch < config.epochs and not state.stopped_early:
                raise _interrupted(state, output)

    best = torch.load(output / CHECKPOINTS / BEST, map_location=device, weights_only=True)
    model.load_state_dict(best, strict=False)
    peak, kind = _peak_memory(device)
    result = FinetuneResult(
        output=str(output.resolve()),
        classes=tuple(data.classes),
        best_epoch=state.best_epoch,
        best_accuracy=state.best_accuracy,
        best_loss=state.best_loss,
        epochs_run=state.epoch,
        steps=state.step,
        stopped_early=state.stopped_early,
        train_images=len(data.train),
        val_images=len(data.val),
        skipped=data.skipped,
        device=device,
        precision=precision,
        seconds=state.seconds + time.monotonic() - started,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        history=tuple(EpochRecord(**h) for h in state.history),
    )
    training = {
        "simsearch_version": __version__,
        "config": asdict(config),
        "base_model": config.model,
        "base_folder": str(folder),
        "base_weights_sha256": base_sha256,
        "frozen_blocks": frozen,
        "result": asdict(result),
    }
    publish(model, folder, output, training)
    return result


def learning_rate(step: int, total_steps: int, warmup: int, peak: float) -> float:
    """Return the learning rate of optimiser step `step` (0-based): linear warm-up from 0 to
    `peak` over `warmup` steps, then a cosine decay to 0 at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def evaluate(
    model, data: TrainingData, batch_size: int, device: str, autocast
) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) on the validation images."""
    import torch

    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for pixels, labels in data.val_batches(batch_size):
            x, y = torch.from_numpy(pixels).to(device), torch.from_numpy(labels).to(device)
            with autocast():
                logits = model(pixel_values=x).logits.float()
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
    model.train()
    return loss / len(data.val), correct / len(data.val)


def read_checkpoint_config(output: str | os.PathLike) -> FinetuneConfig:
    """Return the FinetuneConfig of the interrupted fine-tune in `output`."""
    return FinetuneConfig(**read_checkpoint(Path(output))["config"])


def _check_same_config(config: FinetuneConfig, saved: FinetuneConfig, output: Path) -> None:
    diffs = saved.differences(config)
    if diffs:
        raise FinetuneError(
            f"cannot resume {output} with other settings (checkpoint vs now: "
            f"{'; '.join(diffs)}); resume with the same settings, or start a new --output"
        )


def _check_same_data(checkpoint: dict, base_sha256: str, data: TrainingData, output) -> None:
    if checkpoint["base_weights_sha256"] != base_sha256:
        raise FinetuneError(
            f"cannot resume {output}: the base model's weights are not the ones it started from"
        )
    if checkpoint["classes"] != data.classes or checkpoint["data_fingerprint"] != data.fingerprint:
        raise FinetuneError(
            f"cannot resume {output}: the training or validation images changed since it "
            "started (files added, removed or unreadable); start a new --output"
        )


def _peak_memory(device: str) -> tuple[int | None, str | None]:
    """Return the run's peak memory: CUDA's peak allocation, or the process's peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process RSS"


class _NoBar:
    """Stands in for a progress bar when the caller wants none."""

    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def refresh(self) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _diverged(what: str, state: _State, lr: float) -> FinetuneError:
    """The error for a run whose weights went non-finite: nothing of it is published."""
    return FinetuneError(
        f"training diverged: {what} at step {state.step + 1} (epoch {state.epoch + 1}, learning "
        f"rate {lr:.3g}); nothing from this epoch was published. Run again with a lower --lr "
        "(and --warmup-ratio), or check the model's weights"
    )


def _interrupted(state: _State, output: Path) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"interrupted at step {state.step} (epoch {state.epoch + 1}); progress is saved in "
        f"{output / CHECKPOINTS}; continue with the same command and --resume"
    )


class _StopOnCtrlC:
    """Turns the first Ctrl-C into a request to stop at the next optimiser step (so that
    what is saved is a consistent step); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._installed = False

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
