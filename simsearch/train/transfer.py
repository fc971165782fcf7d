"""Transfer learning: a vision backbone made into an image classifier to train, with its
lower layers frozen, and the optimiser and arithmetic it trains with."""

from __future__ import annotations

from pathlib import Path

from simsearch.errors import FinetuneError, ModelLoadError, first_line
from simsearch.models.embed import cpu_has_native_bf16
from simsearch.models.hub import FINAL_NORM_NAMES, find_blocks, load_pretrained, quiet_transformers

# Unless --freeze-layers says otherwise, the head and this many last blocks train. The lower
# blocks hold generic features (edges, textures, parts) that a few hundred images per class
# cannot improve but can overfit; the last blocks hold what the head reads, and adapting
# them is most of the gain of full fine-tuning. Frozen blocks also keep no activations for
# the backward pass, so memory grows with the trainable blocks only.
DEFAULT_TRAINABLE_BLOCKS = 2

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_training_precision(precision: str, device: str) -> str:
    """Return the arithmetic to train in: fp32, bf16 or fp16 ("auto" resolved for `device`)."""
    import torch

    if precision not in PRECISIONS:
        raise FinetuneError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        # fp16 gradients underflow without loss scaling, and torch scales losses on GPUs;
        # bf16 has fp32's range and needs none.
        raise FinetuneError(
            "precision fp16 trains on CUDA only; use bf16 or fp32 on the CPU", param="precision"
        )
    return precision


def load_for_training(folder: Path, name: str, classes: list[str]):
    """Return `folder`'s model as an image classifier for `classes`: the backbone's weights,
    and a head that is new unless the checkpoint already has one for exactly these classes."""
    from transformers import AutoModelForImageClassification

    labels = dict(enumerate(classes))
    use_safetensors = True if any(folder.glob("*.safetensors")) else None
    try:
        with quiet_transformers():
            model = load_pretrained(
                AutoModelForImageClassification,
                folder,
                use_safetensors,
                num_labels=len(classes),
                id2label=labels,
                label2id={v: k for k, v in labels.items()},
                ignore_mismatched_sizes=True,  # another classifier's head: replaced
            )
    except Exception as exc:
        text = first_line(exc)
        raise ModelLoadError(
            f"cannot load {name} for fine-tuning ({text}): it needs a backbone that "
            "transformers' AutoModelForImageClassification supports (ViT, DeiT, BEiT, DINOv2, ...)"
        ) from None
    return model


def freeze(model, freeze_layers: int | None) -> int:
    """Freeze the embeddings and the first `freeze_layers` blocks; return how many blocks
    are frozen. The head, the later blocks and (when a block trains) the final norm train."""
    vision_config = getattr(model.config, "vision_config", None) or model.config
    blocks = find_blocks(model, vision_config)
    count = len(blocks)
    n = max(count - DEFAULT_TRAINABLE_BLOCKS, 0) if freeze_layers is None else freeze_layers
    if n > count:
        raise FinetuneError(
            f"cannot freeze {n} layers: this model has only {count} blocks (0..{count})",
            param="freeze_layers",
        )
    blocks_name = next(name for name, module in model.named_modules() if module is blocks)
    # The backbone is the model's first-level module that holds the blocks ("vit", "dinov2",
    # "vision_model"); everything outside it is the head.
    backbone_name = blocks_name.split(".")[0]
    backbone = getattr(model, backbone_name)
    if backbone is blocks:
        raise FinetuneError(f"cannot tell the backbone of {type(model).__name__} from its head")
    train = {id(p) for block in list(blocks)[n:] for p in block.parameters()}
    norm = next((getattr(backbone, a) for a in FINAL_NORM_NAMES if hasattr(backbone, a)), None)
    if norm is not None and n < count:
        train |= {id(p) for p in norm.parameters()}
    head = 0
    for name, param in model.named_parameters():
        in_head = not name.startswith(backbone_name + ".")
        head += in_head
        param.requires_grad_(in_head or id(param) in train)
    if not head:
        raise FinetuneError(f"{type(model).__name__} has no classification head to train")
    return n


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of keeping them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise FinetuneError(
            f"{type(model).__name__} does not support gradient checkpointing; train it without",
            param="gradient_checkpointing",
        )
    # Non-reentrant: the reentrant form computes no gradient for a block whose input does
    # not require one, which is every trainable block above frozen ones.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_optimizer(model, lr: float, weight_decay: float, head_lr_scale: float):
    """Return AdamW over the trainable parameters: weight decay on matrices only (decaying
    biases and norm scales only hurts), the head at head_lr_scale times the rate."""
    import torch

    backbone = find_backbone_name(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head = not name.startswith(backbone + ".")
            groups.setdefault((is_head, param.ndim >= 2), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": head_lr_scale if is_head else 1.0,
            }
            for (is_head, decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def find_backbone_name(model) -> str:
    """Return the name of the model's first-level module that holds the blocks."""
    vision_config = getattr(model.config, "vision_config", None) or model.config
    blocks = find_blocks(model, vision_config)
    return next(name for name, module in model.named_modules() if module is blocks).split(".")[0]
