"""One file made ready for the index run: read, hashed, and (when its content is new)
decoded and preprocessed, with the facts the keep rule needs from its header.

The same function runs in the local run's reader threads (ops.ingest) and in the CPU tasks
of a Ray run (ops.ray_ingest), so both apply the same bounds to hostile files and record the
same reasons for the ones that fail.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from simsearch.errors import ImageError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.header import header_facts
from simsearch.media.objects import is_url, read_object
from simsearch.media.preprocess import Preprocessing

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One file after reading and, when its content is new, decoding."""

    real: str  # the path as the file system has it
    key: str  # the path as stored
    size: int
    mtime_ns: int
    device: int | None = None  # st_dev
    sha256: str | None = None
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None  # embedded already (by a Ray worker): no model call here
    width: int = 0  # from the header: the true size, not the draft-mode decode's
    height: int = 0
    format: str | None = None
    lossless: bool | None = None
    error: str | None = None
    known_id: int | None = None  # an image with the same content already has a vector
    seconds: float = 0.0  # spent reading, hashing, decoding and preprocessing


def prepare(
    real: str,
    key: str,
    size: int,
    mtime_ns: int,
    device: int | None,
    error: str | None,
    preprocess: Preprocessing,
    hashes: Mapping[str, int],
    max_pixels: int,
) -> Prepared:
    """Read (a file, or an object by its URL) and hash one file; decode and preprocess it
    unless its content is in `hashes` (embedded already: its vector is reused)."""
    start = time.perf_counter()
    item = Prepared(real, key, size, mtime_ns, device, error=error)
    if item.error is not None:
        return item
    try:
        data = read_object(real) if is_url(real) else read_image_file(real)
        item.size = len(data)
        item.sha256 = hashlib.sha256(data).hexdigest()
        item.known_id = hashes.get(item.sha256)
        if item.known_id is None:  # new content: decode it (known content needs no model)
            item.pixels = preprocess(decode_image(data, max_pixels, draft=preprocess, name=real))
        # From the header: a JPEG decoded in draft mode is smaller than the file.
        facts = header_facts(data, name=real)
        item.width, item.height = facts.width, facts.height
        item.format, item.lossless = facts.format, facts.lossless
    except ImageError as exc:
        item.error = str(exc)
    except Exception as exc:  # a bug in a codec must cost one file, not the run
        log.debug("unexpected error on %s", real, exc_info=True)
        item.error = f"{type(exc).__name__}: {exc}"
    item.seconds = time.perf_counter() - start
    return item
