"""Stable import path of `simsearch.models.embed`, as the README documents it (the code moved
there in the package redesign; this name stays)."""

from simsearch.models.embed import (
    Embedder,
    cpu_has_native_bf16,
    pick_device,
    pick_precision,
    quantize_linear_layers,
    resolve_layer,
)

__all__ = [
    "Embedder",
    "cpu_has_native_bf16",
    "pick_device",
    "pick_precision",
    "quantize_linear_layers",
    "resolve_layer",
]
