"""The fine-tuning loop: epochs of optimiser steps (`Trainer.train_step`), each epoch ended by
`Trainer.end_epoch` (validation, the best weights, early stopping, last.pt), under a warm-up
and cosine schedule and a Ctrl-C that stops at a consistent step.

train/finetune.py sets a run up (config, data, model, resume) and publishes its result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from simsearch.errors import FinetuneError, TrainingInterrupted
from simsearch.progress import NullProgress
from simsearch.records import EpochRecord
from simsearch.train.checkpoints import (
    BEST,
    CHECKPOINT_FORMAT,
    CHECKPOINTS,
    FINETUNE,
    LAST,
    UNFIT,
    check_resume_point,
    checkpoint_error,
    checkpoint_path,
    load_optimizer,
    save_atomic,
    saved_settings,
    trainable_state,
    unfit_reason,
)
from simsearch.train.dataset import TrainingData

if TYPE_CHECKING:
    from simsearch.train.finetune import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
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


@dataclass
class Trainer:
    """One fine-tuning run in progress: what trains, on what, and where it stands."""

    config: FinetuneConfig
    data: TrainingData
    model: Any
    trainable: dict  # name: parameter, for those that train
    optimizer: Any
    scaler: Any  # torch.amp.GradScaler, enabled for fp16 only
    device: str
    precision: str  # fp32, bf16 or fp16
    output: Path
    base_sha256: str  # the base model's weights, checked on resume
    started: float  # time.monotonic() when this process started the run
    state: TrainingState = field(default_factory=TrainingState)
    batches_per_epoch: int = field(init=False)  # forward passes
    total_steps: int = field(init=False)
    warmup: int = field(init=False)

    def __post_init__(self) -> None:
        # One optimiser step per grad_accum forward passes; the last step of an epoch may take
        # fewer. The schedule is a function of the step alone, so a resumed run continues it.
        config = self.config
        self.batches_per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        self.total_steps = math.ceil(self.batches_per_epoch / config.grad_accum) * config.epochs
        self.warmup = (
            config.warmup_steps
            if config.warmup_steps is not None
            else round(config.warmup_ratio * self.total_steps)
        )

    def lr(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based)."""
        return learning_rate(step, self.total_steps, self.warmup, self.config.lr)

    def autocast(self):
        """The mixed-precision context of the forward passes (none in fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device, dtype=dtype)

    def epoch_batches(self) -> list:
        """The current epoch's batches of training-image indices, in its order."""
        order = self.data.epoch_order(self.state.epoch, self.config.seed)
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def train_step(self, group: list) -> float:
        """One optimiser step over the forward passes of `group` (grad_accum batches, fewer
        at the end of an epoch); return its learning rate. A non-finite loss raises
        FinetuneError before the step."""
        import torch

        config, state = self.config, self.state
        images_in_step = sum(len(b) for b in group)
        lr = self.lr(state.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        for indices in group:
            pixels, labels = self.data.train_batch(indices, state.epoch, config.seed)
            x = torch.from_numpy(pixels).to(self.device)
            y = torch.from_numpy(labels).to(self.device)
            with self.autocast():
                logits = self.model(pixel_values=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise _diverged(f"the training loss is {loss.item()}", state, lr)
            # Weighted by images, so the step's gradient is the mean over its images.
            self.scaler.scale(loss * (len(indices) / images_in_step)).backward()
            state.loss_sum += loss.item() * len(indices)
            state.loss_count += len(indices)
        if config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch += len(group)
        return lr

    def end_epoch(self, epoch_start: float) -> EpochRecord:
        """Validate; keep the weights if they are the best so far, else count an epoch
        towards early stopping; move to the next epoch and save last.pt. Return the
        epoch's record."""
        config, state = self.config, self.state
        val_loss, val_accuracy = evaluate(
            self.model, self.data, config.batch_size, self.device, self.autocast
        )
        lr = self.lr(max(state.step - 1, 0))  # the epoch's last step's
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
            lr=lr,
            seconds=time.monotonic() - epoch_start,
            best=better,
        )
        state.history.append(asdict(record))
        if better:
            state.best_epoch, state.bad_epochs = record.epoch, 0
            state.best_accuracy, state.best_loss = val_accuracy, val_loss
            save_atomic(trainable_state(self.trainable), self.output / CHECKPOINTS / BEST)
        else:
            state.bad_epochs += 1
        state.epoch, state.batch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        state.stopped_early = state.bad_epochs >= config.patience and state.epoch < config.epochs
        self.save_last()
        return record

    def save_last(self) -> None:
        """Write last.pt: everything --resume needs to continue from this step."""
        import torch

        elapsed = self.state.seconds + time.monotonic() - self.started
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "config": asdict(self.config),
                "base_weights_sha256": self.base_sha256,
                "classes": self.data.classes,
                "data_fingerprint": self.data.fingerprint,
                "trainable": trainable_state(self.trainable),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": torch.get_rng_state(),  # dropout, drop-path
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device == "cuda" else [],
                "state": {**asdict(self.state), "seconds": elapsed},
            },
            self.output / CHECKPOINTS / LAST,
        )

    def restore(self, checkpoint: dict) -> None:
        """Continue from last.pt (as read_checkpoint returns it): the trainable weights, the
        optimiser, the loss scale, the random state and where training stood."""
        import torch

        path = checkpoint_path(self.output)
        state = saved_settings(TrainingState, checkpoint.get("state"), FINETUNE, path,
                               "training state")  # fmt: skip
        weights = checkpoint.get("trainable")
        # strict=False below (the frozen weights are not saved): check the names here, or a
        # checkpoint short of a weight would resume from the base model's without a word
        names = set(weights) if isinstance(weights, dict) else set()
        if names != set(self.trainable):
            wrong = sorted(set(self.trainable) ^ names)
            raise checkpoint_error(
                FINETUNE,
                path,
                f"its trained weights are not the ones this model trains: {len(wrong)} "
                f"differ, first {wrong[0]}",
                "does not fit this model",
            )
        check_resume_point(state, self.config.epochs, self.batches_per_epoch, FINETUNE, path)
        best = state.best_epoch > 0 or state.stopped_early
        if state.best_epoch > state.epoch or (best and not (path.parent / BEST).is_file()):
            raise checkpoint_error(
                FINETUNE,
                path,
                f"its training state names a best epoch {state.best_epoch} it does not hold",
            )
        try:
            self.model.load_state_dict(weights, strict=False)
            if self.scaler.is_enabled() and checkpoint["scaler"]:
                self.scaler.load_state_dict(checkpoint["scaler"])
            torch.set_rng_state(checkpoint["rng"])
            if self.device == "cuda" and checkpoint["cuda_rng"]:
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        except UNFIT as exc:
            raise checkpoint_error(
                FINETUNE, path, unfit_reason(exc), "does not fit this model"
            ) from None
        load_optimizer(self.optimizer, checkpoint["optimizer"], FINETUNE, path)
        self.state = state

    def load_best(self) -> None:
        """Put the best epoch's weights (best.pt) into the model."""
        import torch

        path = self.output / CHECKPOINTS / BEST
        best = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(best, strict=False)


def train(
    trainer: Trainer,
    progress: Callable | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    on_step: Callable[[int], None] | None,
) -> None:
    """Run the epochs left, until the last or early stopping (see `finetune` for the
    callbacks). Ctrl-C stops after the current step, saves, and raises TrainingInterrupted;
    a second Ctrl-C stops at once."""
    config, output = trainer.config, trainer.output
    trainer.model.train()
    with StopOnCtrlC() as stop:
        while trainer.state.epoch < config.epochs and not trainer.state.stopped_early:
            epoch_start = time.monotonic()
            batches = trainer.epoch_batches()
            desc = f"epoch {trainer.state.epoch + 1}/{config.epochs}"
            bar = (
                progress(total=len(batches), initial=trainer.state.batch, desc=desc)
                if progress
                else NoBar()
            )
            _steps(trainer, batches, bar, stop, on_step)
            bar.close()
            record = trainer.end_epoch(epoch_start)
            if on_epoch is not None:
                on_epoch(record)
            state = trainer.state
            if stop.requested and state.epoch < config.epochs and not state.stopped_early:
                raise _interrupted(state, output)


def _steps(trainer: Trainer, batches: list, bar, stop: StopOnCtrlC, on_step) -> None:
    """The optimiser steps left in the current epoch, saving and stopping on Ctrl-C."""
    state = trainer.state
    while state.batch < len(batches):
        group = batches[state.batch : state.batch + trainer.config.grad_accum]
        lr = trainer.train_step(group)
        bar.update(len(group))
        bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.3f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(state.step)
        if stop.requested:
            trainer.save_last()
            raise _interrupted(state, trainer.output)


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


class NoBar(NullProgress):
    """Stands in for a progress bar when the caller wants none."""

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _diverged(what: str, state: TrainingState, lr: float) -> FinetuneError:
    """The error for a run whose weights went non-finite: nothing of it is published."""
    return FinetuneError(
        f"training diverged: {what} at step {state.step + 1} (epoch {state.epoch + 1}, learning "
        f"rate {lr:.3g}); nothing from this epoch was published. Run again with a lower learning "
        "rate (and a longer warmup), or check the model's weights",
        param="lr",
    )


def _interrupted(state: TrainingState, output: Path) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"interrupted at step {state.step} (epoch {state.epoch + 1}); progress is saved in "
        f"{output / CHECKPOINTS}",
        path=output,
        fix="resume",
    )


class StopOnCtrlC:
    """Turns the first Ctrl-C into a request to stop at the next optimiser step (so that
    what is saved is a consistent step); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._installed = False

    def __enter__(self) -> StopOnCtrlC:
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
