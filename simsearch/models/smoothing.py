"""SmoothQuant-style scaling of a transformer before int8 quantisation.

onnxruntime's dynamic quantisation gives each activation tensor one scale per batch, so the
few channels of a ViT's normalised activations that run far larger than the rest (DINOv2 has
them in every block) take most of the int8 range and the other channels keep few levels.
SmoothQuant (Xiao et al., 2023) divides each such input channel by a factor s and multiplies
the weights that read it by s: the same function in fp32, but the activations' channels are
evened out and the difficulty moved into the weights, which are quantised per output
channel. The factor is s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), with max|x_j| measured on
calibration images.

Where the division is folded:

- the LayerNorm before attention: its weight and bias divided, the q, k, v weights scaled;
- the v projection before the attention output: v's output rows divided (attention averages
  v's channels, so the output projection's input channels are divided alike), the output
  projection scaled;
- the LayerNorm before the MLP: the first MLP layer scaled.

The MLP's output projection reads the activation function's output, where nothing can be
folded: it is left as is. A block whose layout is not recognised is left as is too, and the
caller checks that the scaled model computes what the original does before using it.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Measured on DINOv2-S (benchmarks/int8_quality.py, docs/benchmarks.md): recall@10 of every
# linear layer in int8 0.923 unsmoothed, 0.941 / 0.952 / 0.943 / 0.944 at alpha 0.5 / 0.8 /
# 0.9 / 0.95; with the MLP output left in fp32 0.956 / 0.967 / 0.971 / 0.957.
SMOOTH_ALPHA = 0.8

# Module names across transformers' vision models (5.x): DINOv2 norm1/norm2, ViT/DeiT
# layernorm_before/layernorm_after, CLIP/SigLIP layer_norm1/layer_norm2.
_NORM_BEFORE_ATTENTION = ("norm1", "layernorm_before", "layer_norm1")
_NORM_BEFORE_MLP = ("norm2", "layernorm_after", "layer_norm2")
_ATTENTION = ("attention", "self_attn", "attn")
_ATTENTION_OUTPUT = ("o_proj", "out_proj")


def smoothing_plan(backbone) -> list[tuple]:
    """Return (block index, part, source, readers) for every foldable pair in `backbone`:
    `source` (a LayerNorm, or the v projection) is divided, `readers` (linear layers reading
    its output) scaled. Empty when no block has a known layout."""
    import torch

    plan: list[tuple] = []
    blocks = [m for m in backbone.modules() if _child(m, _NORM_BEFORE_ATTENTION) is not None]
    for i, block in enumerate(blocks):
        norm1 = _child(block, _NORM_BEFORE_ATTENTION)
        norm2 = _child(block, _NORM_BEFORE_MLP)
        attention = _child(block, _ATTENTION)
        mlp = getattr(block, "mlp", None)
        if not all(isinstance(n, torch.nn.LayerNorm) and n.elementwise_affine and n.bias is not None
                   for n in (norm1, norm2)):  # fmt: skip
            continue
        qkv = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        out = _child(attention, _ATTENTION_OUTPUT) if attention is not None else None
        fc1 = getattr(mlp, "fc1", None)
        if not (
            all(isinstance(x, torch.nn.Linear) for x in qkv)
            and isinstance(out, torch.nn.Linear)
            and isinstance(fc1, torch.nn.Linear)
        ):
            continue
        v = qkv[2]
        assert v is not None
        plan.append((i, "qkv", norm1, qkv))
        if v.bias is not None and v.out_features == out.in_features:
            plan.append((i, "attention output", v, [out]))
        plan.append((i, "mlp input", norm2, [fc1]))
    return plan


def smooth(
    module, backbone, pixels: np.ndarray, batch_size: int, alpha: float = SMOOTH_ALPHA,
    progress=None,
) -> int:  # fmt: skip
    """Scale `backbone` (inside `module`, which maps pixels to vectors) in place by the
    activations `module` sees on `pixels`; return the number of pairs scaled. `progress`,
    if given, is advanced per image."""
    import torch

    plan = smoothing_plan(backbone)
    if not plan:
        return 0
    peaks: dict[int, torch.Tensor] = {}
    hooks = []
    for n, (_, _, _, readers) in enumerate(plan):

        def record(_module, inputs, n=n):
            x = inputs[0].detach().abs().flatten(0, -2).amax(0).float()
            peaks[n] = torch.maximum(peaks[n], x) if n in peaks else x

        hooks.append(readers[0].register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                batch = pixels[start : start + batch_size]
                module(torch.from_numpy(np.ascontiguousarray(batch)))
                if progress is not None:
                    progress.update(len(batch))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for n, (_, _, source, readers) in enumerate(plan):
            if n not in peaks:  # a layer the forward pass never reached: left as it is
                continue
            weight = torch.cat([r.weight for r in readers]).abs().amax(0).float()
            # Clamped both ways: a channel never seen (0) or a weight column of zeros must
            # give a finite factor; the function stays the same whatever the factor.
            s = peaks[n].clamp(min=1e-5).pow(alpha) / weight.clamp(min=1e-5).pow(1 - alpha)
            s = s.clamp(min=1e-3, max=1e3)
            if isinstance(source, torch.nn.LayerNorm):
                source.weight.div_(s.to(source.weight.dtype))
                source.bias.div_(s.to(source.bias.dtype))
            else:  # the v projection: its output channels
                source.weight.div_(s[:, None].to(source.weight.dtype))
                source.bias.div_(s.to(source.bias.dtype))
            for reader in readers:
                reader.weight.mul_(s.to(reader.weight.dtype))
    return len(plan)


def _child(module, names: tuple[str, ...]):
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return child
    return None
