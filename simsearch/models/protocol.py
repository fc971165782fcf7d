"""What the rest of simsearch needs of an embedder: the torch `Embedder`, ONNX Runtime's
`OnnxEmbedder` and the index's model-on-demand stand-in are all one of these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from simsearch.media.preprocess import Preprocessing
from simsearch.storage.manifest import Manifest


class PixelEmbedder(Protocol):
    """What the index run needs: batches of preprocessed pixels in, unit vectors out."""

    batch_size: int
    preprocess: Preprocessing

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


class ImageEmbedder(PixelEmbedder, Protocol):
    """A loaded model of an index: images in, and what it is (the manifest it writes)."""

    device: str
    precision: str

    def manifest(self) -> Manifest: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...
