"""The student of a distillation: its size (and FLOPs beside its teacher's), the network
that trains, its agreement with the teacher and its speed, and the folder it is saved as
(the layout is in simsearch/models/student.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from simsearch.errors import DistillError, ModelLoadError
from simsearch.fs.files import FILE_MODE, replaced_atomically
from simsearch.models.hub import find_blocks, load_backbone, quiet_transformers
from simsearch.models.student import (
    PROJECTION_FILE,
    STUDENT_FILE,
    STUDENT_FORMAT,
    projection_metadata_for,
)
from simsearch.models.weights import hash_weights

PREPROCESSOR_FILE = "preprocessor_config.json"

# How a student starts: "teacher", a thinned copy of its teacher (its embeddings, some of its
# blocks, its final norm); "random", a ViT of the chosen size from random weights.
INITS = ("teacher", "random")

# A thinned student's default share of its teacher's blocks: a quarter, so about a quarter
# of its FLOPs (same width and tokens; DINOv2-S: 3 of 12 blocks, 0.26x with the patch
# embedding both keep).
THIN_SHARE = 1 / 4

# Config keys of transformers' backbone API (DINOv2's out_features, ...) that name blocks
# by number: a thinned config recomputes them for its own count.
BLOCK_NUMBERED_KEYS = ("out_features", "out_indices", "stage_names")

# Neighbours compared by the agreement figure: recall@10, as the issue asks and as
# export-model reports for int8.
AGREEMENT_K = 10

# Images per batch and batches timed when measuring embedding speed (after one warm-up
# batch): a few seconds on two cores for DINOv2-S, enough for a stable img/s.
SPEED_BATCH = 16
SPEED_BATCHES = 3


def vit_flops(config: dict, height: int, width: int) -> float | None:
    """Approximate multiply-adds x 2 of one forward pass of a ViT-like backbone at
    height x width: patch embedding, then per block the q/k/v/output projections, the
    attention products and the MLP. None when the config lacks the sizes."""
    try:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        patch = config["patch_size"]
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        mlp = int(config.get("intermediate_size") or float(config.get("mlp_ratio", 4)) * h)
    except (KeyError, TypeError, ValueError):
        return None
    patches = (height // patch) * (width // patch)
    tokens = patches + 1
    embed = 2 * patches * 3 * patch * patch * h
    block = 2 * tokens * (4 * h * h + 2 * h * mlp) + 2 * 2 * tokens * tokens * h
    return float(embed + layers * block)


def default_size(teacher: dict | None) -> dict:
    """The student's default size for a teacher config (None: not available): half the
    width, half the heads (the head size kept), three quarters of the blocks; about a fifth
    of a ViT teacher's FLOPs at 224 px (DINOv2-S: 0.21; ViT-B/16: 0.20)."""
    if teacher is None:
        return {"layers": 6, "hidden": 192, "heads": 3}
    hidden = int(teacher.get("hidden_size", 384))
    heads = int(teacher.get("num_attention_heads", 6))
    layers = int(teacher.get("num_hidden_layers", 12))
    student_heads = max(1, heads // 2)
    head_dim = max(1, hidden // heads)
    return {
        "layers": max(1, round(layers * 3 / 4)),
        "hidden": student_heads * head_dim,
        "heads": student_heads,
    }


def build_student(
    *, layers: int, hidden: int, heads: int, mlp_ratio: float, patch: int, size: tuple, dim: int
):
    """Return (ViTModel backbone, Linear(hidden, dim) projection), randomly initialised."""
    import torch
    from transformers import ViTConfig, ViTModel

    if hidden % heads:
        raise DistillError(
            f"the student's width {hidden} must be a multiple of its {heads} heads",
            param="hidden",
        )
    height, width = size
    if height != width or height % patch:
        raise DistillError(
            f"the index's input is {height}x{width} px, which {patch}-px patches do not tile",
            param="patch_size",
        )
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=round(hidden * mlp_ratio),
        image_size=height,
        patch_size=patch,
    )
    with quiet_transformers():
        backbone = ViTModel(config, add_pooling_layer=False)
    return backbone, torch.nn.Linear(hidden, dim)


def teacher_blocks(layers: int, last: int) -> list[int]:
    """The teacher blocks (1-based) a thinned student of `layers` blocks takes: evenly
    spaced over blocks 1..`last` (the layer the index's vectors come from), ending at it."""
    return [math.floor((i + 1) * last / layers + 0.5) for i in range(layers)]


def thin_teacher(folder: Path, layers: int, last: int, dim: int):
    """Return (backbone, projection, blocks taken): the teacher in `folder` with only
    `layers` of its blocks (`teacher_blocks`), its embeddings and final norm, and a
    Linear(hidden, dim) that starts as the identity when hidden == dim (so the untrained
    student already approximates its teacher). DistillError when the teacher's
    architecture cannot be thinned: not a transformers model with num_hidden_layers and
    blocks that simsearch finds, or fewer blocks than asked for."""
    import torch
    from transformers import PreTrainedModel

    try:
        teacher, config = load_backbone(folder)
        blocks = find_blocks(teacher, config)
    except ModelLoadError as exc:
        raise DistillError(f"cannot start the student from its teacher: {exc}") from None
    if not isinstance(teacher, PreTrainedModel) or teacher.config is not config:
        raise DistillError(
            f"cannot start the student from its teacher: {type(teacher).__name__} is the "
            "vision tower of a two-tower model, which simsearch does not thin; start the "
            "student from random weights",
            param="init",
        )
    if not 1 <= layers <= last:
        raise DistillError(
            f"a student started from its teacher takes 1 to {last} of the teacher's blocks "
            f"(those up to the index's layer), not {layers}",
            param="layers",
        )
    taken = teacher_blocks(layers, last)
    name = next(n for n, m in teacher.named_modules() if m is blocks)
    settings = {k: v for k, v in config.to_dict().items() if k not in BLOCK_NUMBERED_KEYS}
    thin_config = type(config).from_dict({**settings, "num_hidden_layers": layers})
    # The student's weights are the teacher's, block j taking teacher block taken[j].
    renamed = {f"{name}.{j}.": f"{name}.{t - 1}." for j, t in enumerate(taken)}
    source = teacher.state_dict()
    with quiet_transformers():
        student = type(teacher)(thin_config)
    weights = {}
    for key in student.state_dict():
        prefix = next((p for p in renamed if key.startswith(p)), None)
        weights[key] = source[renamed[prefix] + key[len(prefix) :] if prefix else key]
    student.load_state_dict(weights, strict=True)
    hidden = int(config.hidden_size)
    projection = torch.nn.Linear(hidden, dim)
    if hidden == dim:
        with torch.no_grad():
            projection.weight.copy_(torch.eye(dim))
            projection.bias.zero_()
    return student.train(), projection, taken


def fit_position_embeddings(backbone, side: int, patch: int):
    """Return a thinned ViT-like `backbone` rebuilt to take `side` x `side` px: the same
    weights, its config's image_size set to `side`, and its position embeddings resampled
    (bicubic, as transformers interpolates them) to the new grid of patches. DistillError
    when the backbone keeps its position embeddings in a form simsearch does not know."""
    import torch

    grid = side // patch
    key = "embeddings.position_embeddings"
    weights = backbone.state_dict()
    embeddings = weights.get(key)
    old = 0 if embeddings is None else math.isqrt(max(0, embeddings.shape[1] - 1))
    if embeddings is None or embeddings.ndim != 3 or embeddings.shape[1] != old * old + 1:
        raise DistillError(
            f"cannot run a {type(backbone).__name__} started from its teacher at another "
            "input size: its position embeddings are not one [CLS] and a square grid; leave "
            "the image size out, or start the student from random weights",
            param="image_size",
        )
    if old != grid:
        hidden = embeddings.shape[-1]
        rest = embeddings[:, 1:].reshape(1, old, old, hidden).permute(0, 3, 1, 2).float()
        rest = torch.nn.functional.interpolate(
            rest, size=(grid, grid), mode="bicubic", align_corners=False
        )
        rest = rest.permute(0, 2, 3, 1).reshape(1, grid * grid, hidden).to(embeddings.dtype)
        weights[key] = torch.cat([embeddings[:, :1], rest], dim=1)
    config = type(backbone.config).from_dict({**backbone.config.to_dict(), "image_size": side})
    with quiet_transformers():
        rebuilt = type(backbone)(config)
    rebuilt.load_state_dict(weights, strict=True)
    return rebuilt.train(backbone.training)


class StudentNet:
    """The backbone and projection as one callable: pixels in, unit vectors out."""

    def __init__(self, backbone, projection) -> None:
        import torch

        self.backbone, self.projection = backbone, projection
        self.modules = torch.nn.ModuleDict({"backbone": backbone, "projection": projection})

    def __call__(self, pixels):
        import torch

        tokens = self.backbone(pixel_values=pixels).last_hidden_state  # after the final norm
        vectors = self.projection(tokens[:, 0].float())
        return torch.nn.functional.normalize(vectors.float(), dim=-1)


def embed_all(net: StudentNet, pixels: np.ndarray, device: str, batch: int = 64) -> np.ndarray:
    """The student's vectors (float32, unit rows) of preprocessed `pixels`, in fp32."""
    import torch

    net.modules.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[i : i + batch].astype(np.float32)).to(device)
            out.append(net(x).cpu().numpy())
    net.modules.train()
    return np.concatenate(out) if out else np.empty((0, net.projection.out_features), np.float32)


def agreement(
    student: np.ndarray,
    teacher: np.ndarray,
    positions: np.ndarray,
    all_vectors: np.ndarray,
    row_of: np.ndarray,
    k: int = AGREEMENT_K,
) -> dict:
    """recall@k of student-embedded queries against teacher-embedded ones: for each held-out
    image, the share of the top-k found by its teacher vector (its stored one) among the
    index's vectors (itself excluded) that its student vector also finds; and the mean and
    lowest cosine between the two vectors."""
    k = min(k, len(all_vectors) - 1)
    recalls = []
    for start in range(0, len(student), 256):
        s, t = student[start : start + 256], teacher[start : start + 256]
        rows = row_of[positions[start : start + 256]]
        scores_t, scores_s = t @ all_vectors.T, s @ all_vectors.T
        for j, row in enumerate(rows):
            scores_t[j, row] = scores_s[j, row] = -np.inf
        top_t = np.argpartition(-scores_t, k, axis=1)[:, :k]
        top_s = np.argpartition(-scores_s, k, axis=1)[:, :k]
        recalls += [len(set(a) & set(b)) / k for a, b in zip(top_t, top_s, strict=True)]
    cosine = np.sum(student * teacher, axis=1)
    return {
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "mean_cosine": round(float(cosine.mean()), 4),
        "min_cosine": round(float(cosine.min()), 4),
        "queries": len(student),
        "searched": len(all_vectors),
    }


def images_per_second(embed, pixels: np.ndarray) -> float:
    """Throughput of `embed` (pixels -> vectors) on batches of `pixels`, after a warm-up."""
    reps = np.resize(np.arange(len(pixels)), SPEED_BATCH * (SPEED_BATCHES + 1))
    batches = [
        pixels[reps[i : i + SPEED_BATCH]].astype(np.float32)
        for i in range(0, len(reps), SPEED_BATCH)
    ]
    embed(batches[0])
    start = time.perf_counter()
    for b in batches[1:]:
        embed(b)
    return round(SPEED_BATCH * SPEED_BATCHES / (time.perf_counter() - start), 1)


def write_preprocessor(teacher_folder: Path, folder: Path, side: int | None) -> None:
    """Write the student's preprocessor_config.json into `folder`: the teacher's, with its
    resize and crop scaled to `side` when the student sees smaller images (None: the
    teacher's own, unchanged). The written file is read back and must give exactly the
    teacher's preprocessing scaled to `side`."""
    from simsearch.models.hub import load_preprocessing

    if side is None or side == load_preprocessing(teacher_folder).input_side():
        shutil.copy2(teacher_folder / PREPROCESSOR_FILE, folder / PREPROCESSOR_FILE)
        return
    settings = json.loads((teacher_folder / PREPROCESSOR_FILE).read_text())
    want = load_preprocessing(teacher_folder).scaled_to(side)
    if want.resize == "exact":
        settings["size"] = {"height": side, "width": side}
    else:
        settings["size"] = {"shortest_edge": want.size[0]}
    if want.crop is not None:
        settings["crop_size"] = {"height": side, "width": side}
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    if load_preprocessing(folder) != want:
        raise DistillError(
            f"cannot write a {side}-px preprocessor config from the teacher's in "
            f"{teacher_folder}: read back, it does not scale as asked; leave the image size out",
            param="image_size",
        )


def publish_student(
    net: StudentNet, teacher_folder: Path, output: Path, staging: Path, record: dict
) -> None:
    """Save the student at `output`: backbone, projection (with the teacher named in its
    metadata), the teacher's preprocessor_config.json, then simsearch_student.json (with
    the student's weights hash) last: it marks a finished student."""
    from safetensors.torch import save_file

    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        net.backbone.save_pretrained(staging)
    projection = {
        "weight": net.projection.weight.detach().cpu().contiguous(),
        "bias": net.projection.bias.detach().cpu().contiguous(),
    }
    save_file(
        projection, staging / PROJECTION_FILE, metadata=projection_metadata_for(record["teacher"])
    )
    write_preprocessor(teacher_folder, staging, record["student"].get("image_size"))
    record = {
        **record,
        "format": STUDENT_FORMAT,
        "student": {**record["student"], "weights_sha256": hash_weights(staging)},
    }
    for item in sorted(staging.iterdir()):
        if item.is_file():
            os.chmod(item, FILE_MODE)  # safetensors writes 0600; others may need to read it
        os.replace(item, output / item.name)
    with replaced_atomically(output / STUDENT_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
