"""What a vector must be before it is stored: finite, of the index's dimension, unit length.

The store checks every batch before it commits; the embedders' callers check the model's
output with the same function, so a broken model is named before anything is written.
"""

from __future__ import annotations

import numpy as np

from simsearch.errors import ModelOutputError

# How far from 1 a stored vector's length may be: float32 normalisation is exact to ~1e-7,
# fp16 or bf16 models normalise in float32 too; anything further was not normalised.
UNIT_TOLERANCE = 1e-3


def check_vectors(vectors: np.ndarray, dim: int, source: str) -> np.ndarray:
    """Return `vectors` as a (n, dim) float32 array, or raise ModelOutputError naming
    `source` (the model, a file) when they are not all finite unit vectors of `dim`."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ModelOutputError(
            f"{source} produced vectors of shape {tuple(vectors.shape)}, not (n, {dim}): "
            "it is not the model this index was built with; nothing from this batch was stored"
        )
    vectors = np.asarray(vectors, dtype=np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ModelOutputError(
            f"{source} produced {int(bad.sum())} of {len(vectors)} vectors with NaN or "
            "infinite values (broken weights?); nothing from this batch was stored"
        )
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any():
        raise ModelOutputError(
            f"{source} produced {int(off.sum())} of {len(vectors)} vectors that are not of "
            f"unit length (one has length {norms[off][0]:.4g}); nothing from this batch was stored"
        )
    return vectors
