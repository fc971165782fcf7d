"""Setting a distillation up: its checkpoint and output folder, the teacher's folder
(checked against the index) and config, and the figures measured at the end."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.errors import DistillError, ModelLoadError
from simsearch.media.preprocess import Preprocessing
from simsearch.models.embed import Embedder
from simsearch.models.hub import load_preprocessing, resolve_model
from simsearch.models.student import STUDENT_FILE
from simsearch.models.weights import hash_config, hash_weights
from simsearch.train.checkpoints import RunKind
from simsearch.train.distill_student import (
    PREPROCESSOR_FILE,
    THIN_SHARE,
    StudentNet,
    build_student,
    default_size,
    fit_position_embeddings,
    images_per_second,
    thin_teacher,
)

log = logging.getLogger(__name__)

# Version of a distillation's last.pt; another is refused, not misread.
DISTILL_CHECKPOINT_FORMAT = 1


# What an interrupted or finished distillation's output folder says (train/checkpoints.py).
DISTILL = RunKind(
    DistillError, "distillation", "distillation", STUDENT_FILE, "student", "distill",
    DISTILL_CHECKPOINT_FORMAT, kind="distill",
)  # fmt: skip


def find_teacher(teacher, manifest) -> Path:
    """The folder of the index's model (checked by its weights), for its preprocessor
    config, size and speed."""
    name = str(teacher) if teacher is not None else manifest.model
    try:
        folder, _ = resolve_model(name, param="teacher")
    except ModelLoadError as exc:
        raise DistillError(
            f"cannot find the index's model {name} ({exc}); say where the teacher is",
            param="teacher",
        ) from None
    if hash_weights(folder) != manifest.weights_sha256:
        raise DistillError(
            f"{name} is not the index's model (its weights differ from the ones the index "
            "was built with); give the index's own model as the teacher",
            param="teacher",
        )
    if manifest.config_sha256 and hash_config(folder) != manifest.config_sha256:
        raise DistillError(
            f"{name} has another config.json than the index's model", param="teacher"
        )
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise DistillError(f"{folder} has no {PREPROCESSOR_FILE} to give the student")
    wanted = Preprocessing.from_dict(manifest.preprocessing).to_dict()
    if load_preprocessing(folder).to_dict() != wanted:
        raise DistillError(
            f"{folder}'s preprocessing is not the index's; give the index's own model as the "
            "teacher",
            param="teacher",
        )
    return folder


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError):
        return {}
    config = config if isinstance(config, dict) else {}
    return config.get("vision_config") or config


def patch_of(config: dict) -> int:
    patch = config.get("patch_size", 16)
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def student_size(config, teacher: dict) -> dict:
    size = default_size(teacher or None)
    if config.hidden is not None and config.heads is None:
        # keep the default head size
        head_dim = max(1, size["hidden"] // size["heads"])
        size["heads"] = max(1, config.hidden // head_dim) if config.hidden % head_dim == 0 else 1
    for name in ("layers", "hidden", "heads"):
        if getattr(config, name) is not None:
            size[name] = getattr(config, name)
    return size


@dataclass
class StudentStart:
    """A student before training: its network, its size, and how it was initialised."""

    init: str  # "teacher" (thinned from it) or "random"
    backbone: Any
    projection: Any
    size: dict  # layers, hidden, heads
    patch: int
    teacher_blocks: list[int] | None  # a thinned student's: the teacher's blocks, 1-based


def would_thin(config, teacher_config: dict) -> bool:
    """Whether `config` asks for (or, by default, gets) a student thinned from its teacher:
    not "random", and no width, heads or patch size other than the teacher's."""
    return config.init != "random" and not _other_than_teacher(config, teacher_config)


def _other_than_teacher(config, teacher_config: dict) -> list[str]:
    asked = {
        "hidden": (config.hidden, teacher_config.get("hidden_size")),
        "heads": (config.heads, teacher_config.get("num_attention_heads")),
        "patch_size": (config.patch_size, patch_of(teacher_config)),
    }
    return [name for name, (mine, theirs) in asked.items() if mine not in (None, theirs)]


def student_side(config, teacher_config: dict, teacher_side: int | None) -> int | None:
    """The side of the images the student sees (None: the teacher's, whatever it is):
    config.image_size; by default half the teacher's, rounded down to a multiple of its
    patch size, for a thinned student given no layer count. DistillError when the asked
    side is not a multiple of the patch size."""
    patch = config.patch_size or patch_of(teacher_config)
    if config.image_size is not None:
        if config.image_size % patch or config.image_size < patch:
            raise DistillError(
                f"the student's image size {config.image_size} px is not a multiple of its "
                f"{patch}-px patches; try {max(patch, config.image_size // patch * patch)}",
                param="image_size",
            )
        return config.image_size
    if teacher_side is None or config.layers is not None or not would_thin(config, teacher_config):
        return None
    half = teacher_side // 2 // patch * patch
    return half if half >= patch else None


def make_student(
    config, teacher_folder: Path, teacher_config: dict, manifest, size, teacher_side=None
) -> StudentStart:
    """The student `config` asks for: thinned from the teacher (`config.init` "teacher", or
    None where the teacher allows it and no other width, heads or patch size is asked
    for), else random. DistillError when "teacher" is asked for and cannot be had."""
    init = config.init
    teacher_patch = patch_of(teacher_config)
    other = _other_than_teacher(config, teacher_config)
    if init == "teacher" and other:
        raise DistillError(
            f"a student started from its teacher has the teacher's {', '.join(other)}; leave "
            f"{other[0].replace('_', ' ')} out, or start the student from random weights",
            param=other[0],
        )
    if init != "random" and not other:
        last = manifest.layer
        smaller = teacher_side is not None and size[0] < teacher_side
        # Smaller images cut the FLOPs already: then every block up to the index's layer.
        layers = config.layers or (last if smaller else max(1, round(last * THIN_SHARE)))
        try:
            backbone, projection, taken = thin_teacher(teacher_folder, layers, last, manifest.dim)
            if teacher_side is not None and size[0] != teacher_side:
                backbone = fit_position_embeddings(backbone, size[0], teacher_patch)
        except DistillError as exc:
            if init == "teacher":
                raise
            log.info("%s; the student starts from random weights", exc)
        else:
            heads = int(backbone.config.num_attention_heads)
            hidden = int(backbone.config.hidden_size)
            return StudentStart(
                "teacher",
                backbone,
                projection,
                {"layers": layers, "hidden": hidden, "heads": heads},
                teacher_patch,
                taken,
            )
    size_ = student_size(config, teacher_config)
    patch = config.patch_size or teacher_patch
    backbone, projection = build_student(
        **size_, mlp_ratio=config.mlp_ratio, patch=patch, size=size, dim=manifest.dim
    )
    return StudentStart("random", backbone, projection, size_, patch, None)


def speeds(
    net: StudentNet, teacher_folder: Path, manifest, pixels, device: str, teacher_hw=None
) -> dict:
    """img/s of the student on `pixels` and of the teacher (fp32, on `device`) on pixels of
    its own size `teacher_hw` (None: the same pixels)."""
    import torch

    def student(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch).to(device))

    net.modules.eval()
    student_speed = images_per_second(student, pixels)
    net.modules.train()
    teacher_speed = None
    try:
        teacher = Embedder(
            teacher_folder,
            layer=manifest.layer,
            pool=manifest.pool,
            device=device,
            precision="fp32",
        )
        if teacher_hw is not None and tuple(pixels.shape[2:]) != tuple(teacher_hw):
            # Speed does not depend on what the pixels show: noise of the teacher's size.
            shape = (len(pixels), pixels.shape[1], *teacher_hw)
            pixels = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        teacher_speed = images_per_second(teacher.embed_pixels, pixels)
    except ModelLoadError as exc:
        log.warning("cannot time the teacher: %s", exc)
    return {
        "student_images_per_second": student_speed,
        "teacher_images_per_second": teacher_speed,
        "speedup": round(student_speed / teacher_speed, 2) if teacher_speed else None,
        "device": device,
        "precision": "fp32",
    }


def teacher_record(manifest) -> dict:
    keys = ("model", "weights_sha256", "config_sha256", "revision", "architecture")
    record = {k: getattr(manifest, k) for k in keys}
    record.update(
        layer=manifest.layer,
        num_layers=manifest.num_layers,
        pool=manifest.pool,
        dim=manifest.dim,
        preprocessing=manifest.preprocessing,
    )
    return record
