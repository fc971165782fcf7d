"""Thumbnails for the HTML reports: an image read and decoded within the same bounds as for
indexing, shrunk, and encoded as a JPEG data: URI (or the reason there is none)."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

from PIL import Image

from simsearch.errors import ImageError
from simsearch.media.decode import decode_image, read_image_file

# Longest side of a thumbnail in pixels: twice the ~128-200 CSS px a grid cell shows, so
# thumbnails stay sharp on high-density screens.
THUMBNAIL_PX = 256

# JPEG quality of thumbnails: 80 is where artefacts stop being visible at thumbnail size;
# a 256 px photo then takes 10-25 KB (13-33 KB as base64).
THUMBNAIL_QUALITY = 80


@dataclass(frozen=True)
class Thumbnail:
    """One image as a page shows it: a data: URI, or the reason there is none."""

    uri: str | None  # data:image/jpeg;base64,...; None when the image could not be read
    width: int = 0  # of the thumbnail
    height: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _ThumbnailDraft:
    """What decode_image asks of its `draft` argument: the smallest size to decode a JPEG at.

    Pillow's draft mode then decodes a large JPEG at 1/2, 1/4 or 1/8 scale, so a 24 Mpx
    photo costs a fraction of a full decode."""

    longest: int

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        return self.longest, self.longest


def thumbnail_jpeg(
    path: str | os.PathLike, size: int = THUMBNAIL_PX, *, mtime_ns: int | None = None
) -> tuple[bytes, int, int]:
    """Return (JPEG bytes, width, height) of the thumbnail of the image at `path`, its
    longest side `size` at most; ImageError with the reason when there is none (and when,
    given `mtime_ns`, the file opened has another modification time).

    Reading and decoding go through simsearch.media.decode: non-regular files, files above
    MAX_FILE_BYTES and images above MAX_IMAGE_PIXELS are refused before they cost memory.
    """
    try:
        data = read_image_file(path, mtime_ns=mtime_ns)
        img = decode_image(data, draft=_ThumbnailDraft(size), name=path)
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except (OSError, ValueError) as exc:  # e.g. the disk went away mid-read
        raise ImageError(f"cannot make a thumbnail: {exc}") from None
    return buf.getvalue(), img.width, img.height


def make_thumbnail(path: str | os.PathLike, size: int = THUMBNAIL_PX) -> Thumbnail:
    """Return the thumbnail of the image at `path` as a data: URI, or one that carries the
    reason it failed (see thumbnail_jpeg)."""
    try:
        jpeg, width, height = thumbnail_jpeg(path, size)
    except ImageError as exc:
        return Thumbnail(None, error=str(exc))
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return Thumbnail(uri, width, height)
