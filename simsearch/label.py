"""Stable import path of `simsearch.ops.label`, as the README documents it (the code moved
there in the package redesign; this name stays)."""

from simsearch.ops.label import (
    Labeller,
    identify,
    label_index,
    matching_labels,
)

__all__ = ["Labeller", "identify", "label_index", "matching_labels"]
