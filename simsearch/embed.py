"""The Embedder: a transformers vision backbone that turns pixels into unit-length vectors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from simsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, Manifest
from simsearch.errors import LayerError, ModelLoadError
from simsearch.images import Preprocessing

log = logging.getLogger(__name__)

POOLS = ("cls", "mean")
DEVICES = ("auto", "cpu", "cuda")

# Attribute names under which transformers' vision backbones keep the norm that follows the
# last block (ViT, DeiT, DINOv2, BEiT: `layernorm`; CLIP, SigLIP: `post_layernorm`).
FINAL_NORM_NAMES = ("layernorm", "post_layernorm", "norm", "final_layernorm", "ln_post")

# Weight files, in the order we prefer them: safetensors cannot run code when loaded.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class _StopForward(Exception):
    """Raised by a hook once the wanted layer is computed, so later blocks are skipped."""


class Embedder:
    """Loads a vision backbone and embeds images as float32, L2-normalised vectors.

    `model` is a hub id or a folder written by `save_pretrained`. `layer` picks the hidden
    state: 0 is the patch embeddings, 1..N the output of each block, negatives count from the
    end; the default -1 is the last block after the model's final norm. `pool` is "cls" (the
    [CLS] token) or "mean" (the mean of the patch tokens).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        layer: int = -1,
        pool: str = "cls",
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if pool not in POOLS:
            raise LayerError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name = str(model)
        self.pool = pool
        self.batch_size = batch_size
        self.folder, self.revision = resolve_model(self.name)
        # What the manifest records: the hub id, or the absolute folder so that the index can
        # find its model again from any working directory.
        self.model_id = self.name if self.revision else str(self.folder)
        self.device = _pick_device(device)
        self._weights_sha256: str | None = None

        self.model, self.config = _load_backbone(self.folder)
        self.model.to(self.device)
        self.preprocess = _load_preprocessing(self.folder)
        self.dim = int(self.config.hidden_size)
        blocks = _find_blocks(self.model, self.config)
        self.num_layers = len(blocks)
        self.layer = resolve_layer(layer, self.num_layers)
        patch = getattr(self.config, "patch_size", None)
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        self.final_norm = None
        if self.layer == self.num_layers:
            self.final_norm = next(
                (getattr(self.model, n) for n in FINAL_NORM_NAMES if hasattr(self.model, n)), None
            )
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
        """Return the manifest an index built with this embedder records."""
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
        )

    # -- embedding -----------------------------------------------------------------------

    def embed_images(self, images) -> np.ndarray:
        """Return one unit-norm float32 row per RGB PIL image, computed in batches."""
        out = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.embed_pixels(np.stack([self.preprocess(img) for img in chunk])))
        return np.concatenate(out)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Return unit-norm float32 vectors, shape (B, dim), for preprocessed (B, 3, H, W) input."""
        import torch

        if len(pixels) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            tokens = self._tokens(batch)
            if self.final_norm is not None:
                tokens = self.final_norm(tokens)
            prefix = tokens.shape[1] - self._num_patches(batch.shape[-2], batch.shape[-1])
            if self.pool == "cls":
                if prefix < 1:
                    raise LayerError(
                        f"{self.name} has no [CLS] token (model type {self.config.model_type}); "
                        "use --pool mean"
                    )
                vectors = tokens[:, 0]
            else:
                vectors = tokens[:, max(prefix, 0) :].mean(dim=1)
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return vectors.cpu().numpy()

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


def resolve_layer(layer: int, num_layers: int) -> int:
    """Return the absolute hidden-state index (0..num_layers) for a possibly negative `layer`."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise LayerError(
            f"layer {layer} is out of range: this model has {num_layers} layers, so --layer "
            f"takes 0..{num_layers} (0 = patch embeddings) or -1..-{num_layers + 1} from the end"
        )
    return layer if layer >= 0 else num_layers + 1 + layer


def resolve_model(name: str) -> tuple[Path, str | None]:
    """Return the local folder holding model `name`, and its hub revision when it has one.

    A folder is used as it is. A hub id is taken from the Hugging Face cache when it is there;
    otherwise it is downloaded, and if the hub cannot be reached a ModelLoadError says how to
    pass a local folder instead.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder not found: {name}")

    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:
        folder = None
    if folder is None or not _weight_files(folder):
        if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not a local folder, not in the Hugging Face "
                f"cache, and the hub ({constants.ENDPOINT}) cannot be reached. Pass a folder "
                "written by save_pretrained instead: --model /path/to/model or "
                "SIMSEARCH_MODEL=/path/to/model"
            )
        try:
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
            if not _weight_files(folder):
                folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin"]))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot download model {name!r} from the hub: {_first_line(exc)} "
                f"(if {name!r} was meant as a local folder: there is no such folder)"
            ) from None
    return folder, folder.name


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.replace("/", "", 1)
        or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
    )


def _hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Return True when the hub answers; a quick probe instead of minutes of retries."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (OSError, ValueError):
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _weight_files(folder: Path) -> list[Path]:
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


# Weight hashes already computed in this process, keyed by the files' paths, sizes and mtimes:
# hashing ViT-L's 1.2 GB takes about a second, and opening an index with --model and then
# loading that model would otherwise do it twice.
_HASHES: dict[tuple, str] = {}


def hash_weights(folder: Path) -> str:
    """Return the SHA-256 over the model's weight files (name and content, in name order)."""
    files = _weight_files(folder)
    if not files:
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model.bin) in {folder}")
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        _HASHES[key] = _sha256_files(files)
    return _HASHES[key]


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' notices ("torchvision not installed") and bars while loading."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_backbone(folder: Path):
    """Return (vision backbone, its config) from a local model folder, without remote code."""
    from transformers import AutoConfig, AutoModel

    if not _weight_files(folder):
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model.bin) in {folder}")
    use_safetensors = True if any(folder.glob("*.safetensors")) else None
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            vision_config = getattr(config, "vision_config", None)
            if vision_config is not None:
                # A two-tower model (CLIP, SigLIP): load only the vision tower's weights.
                model_cls = type(AutoModel.from_config(vision_config))
                model = model_cls.from_pretrained(folder, use_safetensors=use_safetensors)
            else:
                model = AutoModel.from_pretrained(
                    folder, trust_remote_code=False, use_safetensors=use_safetensors
                )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {_first_line(exc)}") from None
    model.eval()
    backbone = getattr(model, "vision_model", model)
    config = getattr(model, "config", config)
    if getattr(config, "vision_config", None) is not None:
        config = config.vision_config
    return backbone, config


def _load_preprocessing(folder: Path) -> Preprocessing:
    from transformers import AutoImageProcessor

    if not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"no preprocessor_config.json in {folder}: save the checkpoint's image processor "
            "there too (AutoImageProcessor.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        with _quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the image processor in {folder}: {exc}") from None
    return Preprocessing.from_processor(proc)


def _find_blocks(model, config):
    """Return the ModuleList of transformer blocks: the one as long as the layer count."""
    import torch

    want = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        is_blocks = isinstance(module, torch.nn.ModuleList) and want and len(module) == want
        if is_blocks and name.endswith(("layer", "layers", "blocks")):
            return module
    raise ModelLoadError(
        f"cannot find the transformer blocks of {type(model).__name__}: "
        "simsearch supports ViT-style backbones (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision)"
    )


def _pick_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return device
