"""The files of a fine-tuning run: its checkpoints while it trains, and the model folder it
leaves (see simsearch/train/finetune.py for the layout)."""

from __future__ import annotations

import json
import math
import os
import shutil
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from simsearch.errors import FinetuneError, SimsearchError
from simsearch.fs.files import FILE_MODE, replaced_atomically
from simsearch.models.hub import quiet_transformers

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
TRAINING_FILE = "simsearch_training.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

# Version of last.pt's layout; a checkpoint of another version is refused, not misread.
CHECKPOINT_FORMAT = 1


def trainable_state(trainable: dict) -> dict:
    """Return the named parameters that train (what checkpoints hold), on the CPU.

    Not copies: the dict is saved at once, and a copy of every trainable weight was the
    peak of a whole fine-tuning run's memory (+0.34 GB for ViT-B with every block training).
    """
    return {name: param.detach().cpu() for name, param in trainable.items()}


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path`: a kill at any instant
    leaves the previous checkpoint or the new one, never half of one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        torch.save(obj, tmp)


@dataclass(frozen=True)
class RunKind:
    """What the checks of a training run's output folder say of one kind of run: the error
    it raises, the names it gives the run, the file a finished run leaves, its checkpoint
    format, and the `kind` its checkpoints record (None: they record none)."""

    error: type[SimsearchError]
    run: str  # "an interrupted fine-tune"
    checkpoint: str  # "no fine-tuning checkpoint to resume", "not a ... checkpoint"
    finished_file: str
    finished: str  # "holds a finished fine-tune"
    writer: str  # "fine-tuning never overwrites a model"
    format: int
    kind: str | None = None


FINETUNE = RunKind(
    FinetuneError, "fine-tune", "fine-tuning", TRAINING_FILE, "fine-tune", "fine-tuning",
    CHECKPOINT_FORMAT,
)  # fmt: skip


def checkpoint_path(output: str | os.PathLike) -> Path:
    """Where a run in `output` keeps the checkpoint it resumes from."""
    return Path(output) / CHECKPOINTS / LAST


def read_checkpoint(output: Path, run: RunKind = FINETUNE) -> dict:
    """Return the contents of OUTPUT/checkpoints/last.pt, or raise `run`'s error saying why
    there is nothing to resume."""
    import torch

    path = Path(output) / CHECKPOINTS / LAST
    if not path.is_file():
        if (Path(output) / run.finished_file).is_file():
            raise run.error(f"{output} holds a finished {run.finished}; there is nothing to resume")
        raise run.error(f"no {run.checkpoint} checkpoint to resume in {output} ({path} is missing)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise run.error(f"cannot read the checkpoint {path}: {exc}") from None
    if not isinstance(checkpoint, dict) or (
        run.kind is not None and checkpoint.get("kind") != run.kind
    ):
        raise run.error(f"{path} is not a {run.checkpoint} checkpoint")
    if checkpoint.get("format") != run.format:
        raise run.error(
            f"{path} is a checkpoint of format {checkpoint.get('format')!r}; this simsearch "
            f"resumes format {run.format} only"
        )
    return checkpoint


def checkpoint_error(run: RunKind, path: Path, problem: str, verdict: str = "is damaged"):
    """`run`'s error for the checkpoint at `path` that cannot be resumed, and why."""
    return run.error(
        f"the checkpoint {path} {verdict} ({problem}); start in a new output folder",
        param="output",
    )


def saved_settings(cls, saved, run: RunKind, path: Path, what: str = "settings"):
    """Return `cls(**saved)`, a dataclass read back from a checkpoint, or raise `run`'s error
    naming the first value that is not of its field's type, a name `cls` does not have, or
    a value its own checks refuse. A checkpoint is a file: it may have been edited, or
    written by another version, and a TypeError deep in training is no answer to that."""
    if not isinstance(saved, dict):
        raise checkpoint_error(run, path, f"its {what}: a {type(saved).__name__}")
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in saved.items():
        if name not in defaults:
            raise checkpoint_error(run, path, name, f"holds {what} this simsearch does not know")
        # a float is finite, unless the field starts infinite (a best loss before any epoch)
        default = defaults[name]
        infinite_ok = isinstance(default, float) and math.isinf(default)
        if not _is_a(value, hints[name]) or (
            isinstance(value, float) and math.isinf(value) and not infinite_ok
        ):
            raise checkpoint_error(
                run, path, f"its {what}: {name} = {value!r} is not {_hint_name(hints[name])}"
            )
    try:
        return cls(**saved)
    except SimsearchError as exc:
        raise checkpoint_error(run, path, f"its {what}: {exc}") from None


def _is_a(value, hint) -> bool:
    """Whether `value` fits the type hint `hint` (the scalars settings use; any other hint
    is left to the class's own checks). A bool is not a number."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and not math.isnan(value)
    if hint in (str, list, dict, tuple):
        return isinstance(value, hint)
    return True


def _hint_name(hint) -> str:
    """'an integer', 'a number or None': what a type hint asks for, in words."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    name = {"int": "integer", "float": "number", "str": "string", "bool": "true/false"}.get(
        getattr(hint, "__name__", ""), getattr(hint, "__name__", str(hint))
    )
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_resume_point(state, epochs: int, batches: int, run: RunKind, path: Path) -> None:
    """Raise `run`'s error unless a checkpoint's training state (`epoch`, `batch`, `step`,
    `history`) can be where a run of `epochs` epochs of `batches` steps stood: negative
    counts, an epoch past the last, a batch past the epoch's end or history entries that
    are not records would crash, loop or skip training."""
    counts = {k: getattr(state, k) for k in ("epoch", "batch", "step", "loss_count")}
    problem = next((f"{k} = {v} is negative" for k, v in counts.items() if v < 0), None)
    if problem is None and state.epoch > epochs:
        problem = f"epoch {state.epoch} is past the run's {epochs}"
    if problem is None and state.batch > batches:
        problem = f"batch {state.batch} is past an epoch's {batches}"
    if problem is None and state.step > epochs * batches:
        problem = f"step {state.step} is past the run's {epochs * batches}"
    if problem is None and len(state.history) != state.epoch:
        problem = f"{len(state.history)} epoch records for {state.epoch} epochs"
    if problem is None and not all(isinstance(h, dict) for h in state.history):
        problem = "an epoch record that is not one"
    if problem is None and (not math.isfinite(state.seconds) or state.seconds < 0):
        problem = f"seconds = {state.seconds}"
    if problem is not None:
        raise checkpoint_error(run, path, f"its training state: {problem}")


def load_optimizer(optimizer, saved, run: RunKind, path: Path) -> None:
    """Load a checkpoint's optimiser state into `optimizer`, or raise `run`'s error unless
    it is one this run's optimiser makes: each group with the keys and kinds of value a
    fresh one has, each state tensor finite and of its parameter's shape (torch checks only
    the counts; the rest failed at the first step)."""
    fresh_groups = [dict(group) for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except UNFIT as exc:
        raise checkpoint_error(run, path, unfit_reason(exc), "does not fit this run") from None
    problem = next(_optimizer_problems(optimizer, fresh_groups), None)
    if problem is not None:
        raise checkpoint_error(
            run, path, f"its optimiser state: {problem}", "does not fit this run"
        )


def _optimizer_problems(optimizer, fresh_groups: list[dict]):
    import torch

    groups = zip(optimizer.param_groups, fresh_groups, strict=True)
    for number, (group, fresh) in enumerate(groups, 1):
        keys = set(fresh) - {"params"}
        if set(group) - {"params"} != keys:
            yield f"group {number} has the settings {sorted(set(group) - {'params'})}"
        for key in sorted(keys & set(group)):
            if _kind(group[key]) != _kind(fresh[key]):
                yield f"group {number}'s {key} is {group[key]!r}"
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.ndim and value.shape != param.shape:
                    yield f"a {name} of shape {tuple(value.shape)} for {tuple(param.shape)}"
                elif not torch.isfinite(value).all():
                    yield f"a {name} that is not finite"


def _kind(value):
    """What an optimiser setting's value must stay: numbers are numbers, tuples tuples."""
    if isinstance(value, bool) or value is None:
        return type(value)
    if isinstance(value, (int, float)):
        return float
    if isinstance(value, (tuple, list)):
        return (tuple, tuple(_kind(v) for v in value))
    return type(value)


def unfit_reason(exc: BaseException) -> str:
    """One line, at most 200 characters, of why torch would not load a checkpoint's part."""
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# What torch's load_state_dict and set_rng_state raise on parts that do not fit
UNFIT = (RuntimeError, ValueError, KeyError, TypeError, IndexError)


def check_output_free(output: Path, run: RunKind = FINETUNE) -> None:
    """Raise `run`'s error unless `output` is a new or empty folder."""
    if output.exists() and not output.is_dir():
        raise run.error(f"{output} is a file, not a folder", path=output, param="output")
    if output.is_dir() and any(output.iterdir()):
        if (output / CHECKPOINTS / LAST).is_file():
            raise run.error(
                f"{output} holds an interrupted {run.run}: resume it, or choose another "
                "output folder",
                path=output,
                fix="resume",
            )
        raise run.error(
            f"{output} exists and is not empty, and {run.writer} never overwrites a model; "
            "choose a new folder",
            path=output,
            param="output",
        )


def publish(model, base: Path, output: Path, training: dict) -> None:
    """Save the model, the base's image processor and the training record at `output`, then
    drop the checkpoints. simsearch_training.json comes last: it marks a finished run."""
    staging = output / CHECKPOINTS / "publish"
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(staging)
    shutil.copy2(base / PREPROCESSOR_FILE, staging / PREPROCESSOR_FILE)
    for item in sorted(staging.iterdir()):
        if item.is_file():
            # As open() would make it: safetensors writes its file 0600, which another user
            # of a shared model folder (or a server's account) then cannot read.
            os.chmod(item, FILE_MODE)
        os.replace(item, output / item.name)
    with replaced_atomically(output / TRAINING_FILE) as tmp:
        tmp.write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
