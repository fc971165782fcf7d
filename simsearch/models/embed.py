"""The Embedder: a transformers vision backbone that turns pixels into unit-length vectors."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from simsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MODEL
from simsearch.errors import LayerError, ModelLoadError
from simsearch.media.preprocess import embed_in_batches
from simsearch.models.hub import (
    FINAL_NORM_NAMES,
    find_blocks,
    load_backbone,
    load_preprocessing,
    recorded_name,
    resolve_model,
)
from simsearch.models.student import Student, is_student, load_projection, read_student
from simsearch.models.weights import hash_config, hash_weights
from simsearch.storage.manifest import Manifest

log = logging.getLogger(__name__)

POOLS = ("cls", "mean")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


class _StopForward(Exception):
    """Raised by a hook once the wanted layer is computed, so later blocks are skipped."""


class Embedder:
    """Loads a vision backbone and embeds images as float32, L2-normalised vectors.

    `model` is a hub id or a folder written by `save_pretrained`. `layer` picks the hidden
    state: 0 is the patch embeddings, 1..N the output of each block, negatives count from the
    end; the default -1 is the last block after the model's final norm. `pool` is "cls" (the
    [CLS] token) or "mean" (the mean of the patch tokens); None is "cls". A student that
    `simsearch distill` made embeds into its teacher's space: its last block's [CLS] token
    through its projection, and its manifest is the teacher's (`student`: the student); a
    `layer` or `pool` other than the teacher's is refused. `precision` is the arithmetic of
    the forward pass: "fp32"; "bf16" or "fp16" (autocast: matrix products in 16 bits, norms
    and softmax in fp32); "int8" (dynamic quantisation of the linear layers, CPU only); or
    "auto", the fastest faithful one here: fp16 on CUDA, bf16 on CPUs with native bf16,
    else fp32. None means "auto" (the CLI reads $SIMSEARCH_PRECISION; the library reads
    no environment variable).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        layer: int = -1,
        pool: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if pool is not None and pool not in POOLS:
            raise LayerError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name = str(model)
        self.batch_size = batch_size
        self.folder, self.revision = resolve_model(self.name)
        self.student: Student | None = None
        if is_student(self.folder):
            self.student = read_student(self.folder)
            check_student_request(self.student, layer, pool)
            layer, pool = -1, "cls"  # the student's own: what its projection reads
        self.pool = pool or "cls"
        self.model_id = recorded_name(self.name, self.folder, self.revision)
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self._weights_sha256: str | None = None

        self.model, self.config = load_backbone(self.folder)
        self.model.to(self.device)
        self.preprocess = load_preprocessing(self.folder)
        self.dim = int(self.config.hidden_size)
        self.projection = None
        if self.student is not None:
            self._load_student(self.student)
        blocks = find_blocks(self.model, self.config)
        self.num_layers = len(blocks)
        self.layer = resolve_layer(layer, self.num_layers)
        patch = getattr(self.config, "patch_size", None)
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        self.final_norm = None
        if self.layer == self.num_layers:
            self.final_norm = next(
                (getattr(self.model, n) for n in FINAL_NORM_NAMES if hasattr(self.model, n)), None
            )
        if self.precision == "int8":
            quantize_linear_layers(self.model)  # in place: the hooks below stay attached
        self._captured = None
        if self.layer == 0:
            blocks[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)
        else:
            blocks[self.layer - 1].register_forward_hook(self._capture_output)

    # -- identity ------------------------------------------------------------------------

    @property
    def weights_sha256(self) -> str:
        """Return the SHA-256 of the weight files: what makes two models the same model."""
        if self._weights_sha256 is None:
            self._weights_sha256 = hash_weights(self.folder)
        return self._weights_sha256

    def manifest(self) -> Manifest:
        """Return the manifest an index built with this embedder records (a student's: its
        teacher's space, naming the student)."""
        if self.student is not None:
            return self.student.manifest(self.model_id, self.precision)
        return Manifest(
            model=self.model_id,
            weights_sha256=self.weights_sha256,
            revision=self.revision,
            architecture=str(getattr(self.config, "model_type", "unknown")),
            layer=self.layer,
            num_layers=self.num_layers,
            pool=self.pool,
            dim=self.dim,
            preprocessing=self.preprocess.to_dict(),
            precision=self.precision,
            config_sha256=hash_config(self.folder),
        )

    # -- embedding -----------------------------------------------------------------------

    def embed_images(self, images) -> np.ndarray:
        """Return one unit-norm float32 row per RGB PIL image, computed in batches."""
        return embed_in_batches(self, images)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Return unit-norm float32 vectors, shape (B, dim), for preprocessed (B, 3, H, W) input."""
        import torch

        if len(pixels) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            tokens = self._tokens(batch)
            if self.final_norm is not None:
                tokens = self.final_norm(tokens)
            prefix = tokens.shape[1] - self._num_patches(batch.shape[-2], batch.shape[-1])
            if self.pool == "cls":
                if prefix < 1:
                    raise LayerError(
                        f"{self.name} has no [CLS] token (model type {self.config.model_type}); "
                        "use mean pooling",
                        param="pool",
                    )
                vectors = tokens[:, 0]
            else:
                vectors = tokens[:, max(prefix, 0) :].mean(dim=1)
            if self.projection is not None:
                vectors = self.projection(vectors.float())
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return vectors.cpu().numpy()

    def _load_student(self, student: Student) -> None:
        """Check a student's backbone against its record and load its projection."""
        if int(self.config.hidden_size) != student.hidden:
            raise ModelLoadError(
                f"the student model in {self.folder} cannot be used: its backbone is "
                f"{self.config.hidden_size} wide, but its record says {student.hidden}; "
                "distill it again",
                param="model",
            )
        if self.preprocess.to_dict() != student.preprocessing():
            raise ModelLoadError(
                f"the student model in {self.folder} cannot be used: its "
                "preprocessor_config.json is not its teacher's preprocessing (scaled to the "
                "image size its record names); distill it again",
                param="model",
            )
        self.projection = load_projection(student).to(self.device)
        self.dim = student.dim
        log.info("%s is %s", self.name, student.describe())

    def _autocast(self):
        import torch

        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device, dtype=dtype)
        return contextlib.nullcontext()

    def _tokens(self, batch):
        self._captured = None
        with contextlib.suppress(_StopForward):
            self.model(pixel_values=batch)
        tokens, self._captured = self._captured, None
        if tokens is None:
            raise LayerError(f"layer {self.layer} of {self.name} produced no hidden state")
        return tokens

    def _capture_input(self, module, args, kwargs):
        self._captured = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    def _capture_output(self, module, args, output):
        self._captured = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopForward

    def _num_patches(self, height: int, width: int) -> int:
        ph, pw = self.patch_size
        if not ph or not pw:
            return 0
        return (height // ph) * (width // pw)


def check_student_request(student: Student, layer: int | None, pool: str | None) -> None:
    """Raise LayerError unless `layer` and `pool` are the default or the teacher's own: a
    student computes one thing, its teacher's vectors."""
    teacher = student.teacher
    layers = (None, -1, teacher["layer"], teacher["layer"] - teacher["num_layers"] - 1)
    if layer not in layers:
        raise LayerError(
            f"{student.folder} is a student: it computes its teacher's layer "
            f"{teacher['layer']} only, not layer {layer}; leave the layer out",
            param="layer",
        )
    if pool is not None and pool != teacher["pool"]:
        raise LayerError(
            f"{student.folder} is a student: it computes its teacher's {teacher['pool']} "
            f"pooling only, not {pool}; leave the pooling out",
            param="pool",
        )


def default_pool(model: str | os.PathLike) -> str:
    """The pooling `model` computes when none is asked for: a student's teacher's, else cls."""
    folder = Path(str(model)).expanduser()
    if is_student(folder):
        return read_student(folder.resolve()).teacher["pool"]
    return "cls"


def resolve_layer(layer: int, num_layers: int) -> int:
    """Return the absolute hidden-state index (0..num_layers) for a possibly negative `layer`."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise LayerError(
            f"layer {layer} is out of range: this model has {num_layers} layers, so a layer is "
            f"0..{num_layers} (0 = patch embeddings) or -1..-{num_layers + 1} from the end",
            param="layer",
        )
    return layer if layer >= 0 else num_layers + 1 + layer


def pick_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ModelLoadError(
            f"unknown device {device!r}; choose one of {', '.join(DEVICES)}", param="device"
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device cuda was asked for, but torch sees no CUDA device", param="device"
        )
    return device


def pick_precision(precision: str | None, device: str) -> str:
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}",
            param="precision",
        )
    if precision == "auto":
        if device == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "int8" and device != "cpu":
        raise ModelLoadError(
            "precision int8 runs on the CPU only; use fp16 on CUDA", param="precision"
        )
    return precision


def cpu_has_native_bf16() -> bool:
    """Return True when this CPU computes bf16 matrix products natively (AVX512-BF16, AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def cpu_has_amx() -> bool:
    """Return True when this CPU has AMX matrix units that torch's bf16 uses: there bf16
    autocast ran DINOv2-S ~3x faster than ONNX Runtime's fp32 (docs/benchmarks.md). A
    ONEDNN_MAX_CPU_ISA that stops below AMX (oneDNN's own setting) turns them off for torch,
    and so here."""
    import torch

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if isa not in ("ALL", "DEFAULT") and "AMX" not in isa:
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: assume not
        return False


def quantize_linear_layers(model) -> None:
    """Quantise the attention projections to int8 (dynamic, per-channel weights), in place.

    Only the attention's linear layers: the MLP's take the LayerNorm and GELU outputs, whose
    outlier channels (DINOv2 has them) per-tensor activation scales cannot hold. On the real
    DINOv2-S, quantising every linear layer kept recall@10 against fp32 at 0.83; the
    attention alone keeps 0.93 (docs/benchmarks.md). Models with no layer named like
    attention get every linear layer quantised.
    """
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise ModelLoadError(
            "precision int8 needs torch.ao.quantization", param="precision"
        ) from None
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("attention" in name or "attn" in name)
    } or {torch.nn.Linear: per_channel_dynamic_qconfig}
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")  # torch's notice that this API moves to torchao
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
