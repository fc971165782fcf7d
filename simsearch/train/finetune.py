"""Fine-tuning: a classification head on a vision backbone, trained on folders of labelled
images and saved as a folder that `simsearch index` and `simsearch label` take as --model.

The shape follows nanoGPT: one config dataclass whose defaults say why they are what they
are, one loop that reads top to bottom (train/loop.py: `train_step`, then `end_epoch`), and
checkpoints that carry their config and step.

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

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from simsearch._version import __version__
from simsearch.config import DEFAULT_MODEL, DEFAULT_WORKERS
from simsearch.errors import FinetuneError
from simsearch.models.embed import pick_device
from simsearch.models.hub import load_preprocessing, resolve_model
from simsearch.models.weights import hash_weights
from simsearch.records import EpochRecord, FinetuneResult
from simsearch.train.checkpoints import (
    FINETUNE,
    check_output_free,
    checkpoint_path,
    publish,
    read_checkpoint,
    saved_settings,
)
from simsearch.train.dataset import TrainingData
from simsearch.train.loop import NoBar, Trainer, train
from simsearch.train.transfer import (
    PRECISIONS,
    enable_gradient_checkpointing,
    freeze,
    load_for_training,
    make_optimizer,
    pick_training_precision,
)


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
            (self.seed >= 0, "seed must not be negative"),
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
    import torch  # noqa: F401  (without it nothing below runs: fail before reading anything)

    started = time.monotonic()
    output = Path(output)
    checkpoint = read_checkpoint(output) if resume else None
    if checkpoint is not None:
        saved = _saved_config(checkpoint, output)
        config = config or saved
    config = config or FinetuneConfig()
    if checkpoint is None:
        check_output_free(output)
    else:
        _check_same_config(config, saved, output)

    folder, _ = resolve_model(config.model)
    base_sha256 = hash_weights(folder)
    data = _read_data(data_dir, folder, config, progress)
    if checkpoint is not None:
        _check_same_data(checkpoint, base_sha256, data, output)

    trainer, frozen = _start(config, folder, data, device, checkpoint, output, base_sha256, started)
    train(trainer, progress, on_epoch, on_step)
    trainer.load_best()

    result = _result(trainer, started)
    training = {
        "simsearch_version": __version__,
        "config": asdict(config),
        "base_model": config.model,
        "base_folder": str(folder),
        "base_weights_sha256": base_sha256,
        "frozen_blocks": frozen,
        "result": asdict(result),
    }
    publish(trainer.model, folder, output, training)
    return result


def _read_data(data_dir, folder: Path, config: FinetuneConfig, progress) -> TrainingData:
    """Read and preprocess the training and validation images once, with a progress bar."""
    preprocess = load_preprocessing(folder)
    bar = progress(total=0, desc="reading images") if progress else NoBar()
    try:
        return TrainingData(
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


def _start(
    config: FinetuneConfig,
    folder: Path,
    data: TrainingData,
    device: str,
    checkpoint: dict | None,
    output: Path,
    base_sha256: str,
    started: float,
) -> tuple[Trainer, int]:
    """Return the run's Trainer (the backbone with a new head for `data`'s classes, frozen
    and optimised as `config` says, where `checkpoint` left it when resuming), and the
    number of blocks frozen."""
    import torch

    device = pick_device(device)
    precision = pick_training_precision(config.precision, device)
    torch.manual_seed(config.seed)  # the new head's initial weights
    model = load_for_training(folder, config.model, data.classes).to(device)
    frozen = freeze(model, config.freeze_layers)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.head_lr_scale)
    trainer = Trainer(
        config=config,
        data=data,
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device, enabled=precision == "fp16"),
        device=device,
        precision=precision,
        output=output,
        base_sha256=base_sha256,
        started=started,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return trainer, frozen


def _result(trainer: Trainer, started: float) -> FinetuneResult:
    state, data = trainer.state, trainer.data
    peak, kind = _peak_memory(trainer.device)
    return FinetuneResult(
        output=str(trainer.output.resolve()),
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
        device=trainer.device,
        precision=trainer.precision,
        seconds=state.seconds + time.monotonic() - started,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        history=tuple(EpochRecord(**h) for h in state.history),
    )


def read_checkpoint_config(output: str | os.PathLike) -> FinetuneConfig:
    """Return the FinetuneConfig of the interrupted fine-tune in `output`."""
    return _saved_config(read_checkpoint(Path(output)), Path(output))


def _saved_config(checkpoint: dict, output: Path) -> FinetuneConfig:
    """The FinetuneConfig a checkpoint holds; FinetuneError when it is not one (edited)."""
    return saved_settings(
        FinetuneConfig, checkpoint.get("config"), FINETUNE, checkpoint_path(output)
    )


def _check_same_config(config: FinetuneConfig, saved: FinetuneConfig, output: Path) -> None:
    diffs = saved.differences(config)
    if diffs:
        raise FinetuneError(
            f"cannot resume {output} with other settings (checkpoint vs now: "
            f"{'; '.join(diffs)}); resume with the same settings, or start in a new output folder",
            path=output,
            param="output",
        )


def _check_same_data(checkpoint: dict, base_sha256: str, data: TrainingData, output) -> None:
    if checkpoint.get("base_weights_sha256") != base_sha256:
        raise FinetuneError(
            f"cannot resume {output}: the base model's weights are not the ones it started from"
        )
    if (
        checkpoint.get("classes") != data.classes
        or checkpoint.get("data_fingerprint") != data.fingerprint
    ):
        raise FinetuneError(
            f"cannot resume {output}: the training or validation images changed since it "
            "started (files added, removed or unreadable); start in a new output folder",
            path=output,
            param="output",
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
