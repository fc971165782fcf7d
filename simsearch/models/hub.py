"""Finding and loading checkpoints: hub ids or local folders, weights, image processors.

Nothing here runs code from a model repository: a folder whose configs ask for it
(`auto_map`) is refused before transformers sees it, and every loader passes
trust_remote_code=False (without it, transformers asks on the terminal and runs the
folder's Python on "y"). Safetensors weights are preferred over pickles, and a config that
describes a far larger model than its weights hold is refused before anything is allocated
(check_size). Which files are the weights, and their hashes, are in models/weights.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from simsearch.errors import ModelLoadError, first_line
from simsearch.media.preprocess import Preprocessing
from simsearch.models.weights import safetensors_values, weight_files

log = logging.getLogger(__name__)

# Attribute names under which transformers' vision backbones keep the norm that follows the
# last block (ViT, DeiT, DINOv2, BEiT: `layernorm`; CLIP, SigLIP: `post_layernorm`).
FINAL_NORM_NAMES = ("layernorm", "post_layernorm", "norm", "final_layernorm", "ln_post")

# Configs are small; a larger "config" is not read to look for auto_map, it is refused.
CONFIG_READ_LIMIT = 16 << 20


def refuse_code(folder: Path) -> None:
    """Raise ModelLoadError when a JSON file in model `folder` asks transformers to run the
    folder's own code (an `auto_map` naming classes in its .py files)."""
    for file in sorted(folder.glob("*.json")):
        try:
            if file.stat().st_size > CONFIG_READ_LIMIT:
                if file.name.endswith("config.json"):
                    raise ModelLoadError(
                        f"{file} is {file.stat().st_size} bytes, not a model config "
                        f"(at most {CONFIG_READ_LIMIT >> 20} MiB)"
                    )
                continue
            data = json.loads(file.read_bytes())
        except (OSError, ValueError):
            continue  # unreadable: the loader that needs it says so
        if isinstance(data, dict) and data.get("auto_map"):
            named = data["auto_map"]
            names = ", ".join(
                str(v) for v in (named.values() if isinstance(named, dict) else [named])
            )
            raise ModelLoadError(
                f"the model in {folder} asks to run its own code ({file.name} has an "
                f"auto_map naming {names[:200]}); simsearch never runs code from a model "
                "folder: use a model that transformers loads without it"
            )


def recorded_name(name: str, folder: Path, revision: str | None) -> str:
    """What a manifest (or a label record) names model `name` by, once resolved to `folder`
    and `revision`: a hub id as it is, a folder by its absolute path (the index finds it
    again from any working directory)."""
    return name if revision else str(folder)


def resolve_model(name: str, param: str = "model") -> tuple[Path, str | None]:
    """Return the local folder holding model `name`, and its hub revision when it has one.

    A folder is used as it is. A hub id is taken from the Hugging Face cache when it is there;
    otherwise it is downloaded, and if the hub cannot be reached a ModelLoadError says how to
    pass a local folder instead (`param`: the setting that names the model, for the error).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        refuse_code(path.resolve())
        return path.resolve(), None
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder not found: {name}", param=param, path=name)

    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:
        folder = None
    if folder is None or not weight_files(folder):
        if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not a local folder, not in the Hugging Face "
                f"cache, and the hub ({constants.ENDPOINT}) cannot be reached. Give a folder "
                "written by save_pretrained instead",
                param=param,
            )
        try:
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
            if not weight_files(folder):
                folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin"]))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot download model {name!r} from the hub: {first_line(exc)} "
                f"(if {name!r} was meant as a local folder: there is no such folder)"
            ) from None
    refuse_code(folder)
    return folder, folder.name


def can_load(name: str) -> bool:
    """Whether hub id `name` loads here: in the Hugging Face cache, or the hub answers."""
    from huggingface_hub import constants, snapshot_download

    try:
        if weight_files(Path(snapshot_download(name, local_files_only=True))):
            return True
    except Exception:
        pass
    return not constants.HF_HUB_OFFLINE and _hub_reachable(constants.ENDPOINT)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.replace("/", "", 1)
        or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
    )


def _hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Return True when the hub answers; a quick probe instead of minutes of retries."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def quiet_transformers():
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


def load_backbone(folder: Path):
    """Return (vision backbone, its config) from a local model folder, without remote code."""
    from transformers import AutoConfig, AutoModel

    refuse_code(folder)
    if not weight_files(folder):
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model.bin) in {folder}")
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    use_safetensors = True if any(folder.glob("*.safetensors")) else None
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            vision_config = getattr(config, "vision_config", None)
            # A two-tower model (CLIP, SigLIP): load only the vision tower's weights.
            model_cls = AutoModel if vision_config is None else MODEL_MAPPING[type(vision_config)]
            check_size(model_cls, config if vision_config is None else vision_config, folder)
            model = load_pretrained(model_cls, folder, use_safetensors)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {first_line(exc)}") from None
    model.eval()
    backbone = getattr(model, "vision_model", model)
    config = getattr(model, "config", config)
    if getattr(config, "vision_config", None) is not None:
        config = config.vision_config
    return backbone, config


# What a checkpoint's config.json says when it holds a trained classification head.
HEAD_ARCHITECTURE = "ForImageClassification"

# The names transformers gives classes when a config has none of its own ("LABEL_0", ...).
PLACEHOLDER_LABEL = re.compile(r"LABEL_\d+")


def load_classifier(folder: Path, name: str):
    """Return (image classification model, its config) from a local folder, or raise a
    ModelLoadError saying that `name` is not a checkpoint with a trained head.

    transformers happily puts a random head on a bare backbone (it only logs a notice), and
    such a model would label every photo with confident nonsense; so the head's weights must
    all come from the checkpoint, and the config must name its classes.
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    need = (
        "labelling needs an image classification checkpoint (AutoModelForImageClassification, "
        "with id2label class names), e.g. google/vit-large-patch16-384"
    )
    refuse_code(folder)
    if not weight_files(folder):
        raise ModelLoadError(f"no weight files (*.safetensors or pytorch_model.bin) in {folder}")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name}: {first_line(exc)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(HEAD_ARCHITECTURE in a for a in architectures):
        raise ModelLoadError(
            f"{name} has no classification head (it is a {', '.join(architectures)}): {need}"
        )
    use_safetensors = True if any(folder.glob("*.safetensors")) else None
    check_size(AutoModelForImageClassification, config, folder)
    try:
        with quiet_transformers():
            model, info = load_pretrained(
                AutoModelForImageClassification, folder, use_safetensors, output_loading_info=True
            )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {name} as an image classifier ({first_line(exc)}): {need}"
        ) from None
    untrained = sorted(set(info.get("missing_keys", ())) | _names(info.get("mismatched_keys")))
    if untrained:
        raise ModelLoadError(
            f"{name} has no trained classification head (the checkpoint lacks "
            f"{', '.join(untrained[:3])}{', ...' if len(untrained) > 3 else ''}): {need}"
        )
    id2label = dict(getattr(model.config, "id2label", None) or {})
    if not id2label or all(PLACEHOLDER_LABEL.fullmatch(str(v)) for v in id2label.values()):
        raise ModelLoadError(
            f"{name} names no classes (its config's id2label is only LABEL_0, LABEL_1, ...): {need}"
        )
    model.eval()
    return model, model.config


def _names(keys) -> set[str]:
    """Return the parameter names of transformers' mismatched_keys (name, shapes) tuples."""
    return {k[0] if isinstance(k, tuple) else str(k) for k in keys or ()}


# How many times the values in the weight files the model a config describes may hold: a
# backbone without its pooler, or a classifier's new head, add a little; a config that
# does not belong to the weights (hidden_size 32768 beside 32-dim weights grew to 24 GB
# before the kernel stopped it) adds orders of magnitude.
CONFIG_OVER_WEIGHTS = 2.0
CONFIG_OVER_WEIGHTS_SLACK = 10_000_000  # parameters: a new head over many classes


def check_size(model_cls, config, folder: Path) -> None:
    """Raise ModelLoadError when the model `config` describes is far larger than the
    weights in `folder` (safetensors, whose header says), before anything is allocated:
    its parameters are counted on PyTorch's meta device, which holds no data."""
    stored = safetensors_values(folder)
    if stored is None:
        return  # pickled weights: transformers reads them with weights_only
    import torch

    try:
        with torch.device("meta"), quiet_transformers():
            skeleton = (
                model_cls.from_config(config)
                if hasattr(model_cls, "from_config")
                else model_cls._from_config(config)
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model config.json in {folder} describes: "
                             f"{first_line(exc)}") from None  # fmt: skip
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted > CONFIG_OVER_WEIGHTS * stored + CONFIG_OVER_WEIGHTS_SLACK:
        raise ModelLoadError(
            f"config.json in {folder} describes a model of {wanted:,} parameters, but its "
            f"weights hold {stored:,} values: the config does not belong to these weights"
        )


def load_pretrained(model_cls, folder: Path, use_safetensors: bool | None, **extra):
    """Load with PyTorch's fused scaled-dot-product attention, or the default if unsupported."""
    kwargs = dict(use_safetensors=use_safetensors, **extra)
    if model_cls.__name__.startswith("Auto"):
        kwargs["trust_remote_code"] = False
    try:
        return model_cls.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as exc:
        if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
            raise
        log.debug("no SDPA attention for %s: %s", model_cls.__name__, exc)
        return model_cls.from_pretrained(folder, **kwargs)


def load_preprocessing(folder: Path) -> Preprocessing:
    from transformers import AutoImageProcessor

    refuse_code(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"no preprocessor_config.json in {folder}: save the checkpoint's image processor "
            "there too (AutoImageProcessor.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        with quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the image processor in {folder}: {exc}") from None
    return Preprocessing.from_processor(proc)


def find_blocks(model, config):
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
