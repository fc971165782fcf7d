"""Stable import path of `simsearch.models.onnx_export`, as the README documents it (the code moved
there in the package redesign; this name stays)."""

from simsearch.models.onnx_export import (
    export_model,
    recall_at_k,
    sample_photos,
)

__all__ = ["export_model", "recall_at_k", "sample_photos"]
