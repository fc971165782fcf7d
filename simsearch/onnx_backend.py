"""Stable import path of `simsearch.models.onnx`, as the README documents it (the code moved
there in the package redesign; this name stays)."""

from simsearch.models.onnx import (
    OnnxEmbedder,
    import_onnxruntime,
    read_export_info,
    source_manifest,
)

__all__ = ["OnnxEmbedder", "import_onnxruntime", "read_export_info", "source_manifest"]
