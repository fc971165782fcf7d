"""What an image file's header says of it (true pixel size, format, lossless or not): the
facts dedup's keep rule compares, read without decoding a pixel."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image

from simsearch.config import RAW_SUFFIXES
from simsearch.errors import ImageError, first_line
from simsearch.media.decode import open_regular, read_image_file
from simsearch.media.formats import optional_module, pillow_formats


@dataclass(frozen=True)
class HeaderFacts:
    """What an image file's header says of it: the facts dedup's keep rule compares."""

    width: int  # as displayed: EXIF quarter turns applied
    height: int
    format: str | None  # Pillow's name for the format: "JPEG", "PNG", "WEBP", ...
    lossless: bool  # the encoding kept every pixel it was given


# Formats whose encoding keeps every pixel. GIF is left out: its 256-colour palette loses more
# of a photo than a JPEG copy does. WebP and TIFF are either, and are looked at more closely.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "DIB", "PPM", "TGA", "QOI", "SGI", "PCX", "ICNS"})

# TIFF compressions that lose detail (Pillow's names); the others (none, LZW, deflate,
# PackBits, ...) keep every pixel.
_LOSSY_TIFF = frozenset({"jpeg", "tiff_jpeg", "webp", "jpeg2000"})

# EXIF orientations that turn the picture a quarter: the displayed width is the stored height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})

# Bytes of a WebP file read to find its bitstream chunk: the RIFF header and the chunks
# before the image data (VP8X, ICCP, ANIM, ALPH) fit in this unless a colour profile is huge.
_WEBP_PROBE_BYTES = 64 * 1024


def header_facts(
    source: bytes | str | os.PathLike, *, name: str | os.PathLike | None = None
) -> HeaderFacts:
    """Return an image's true pixel size (from its header, not a decode: a JPEG decoded in
    draft mode is smaller), its format, and whether it is losslessly encoded. `source`: the
    file's bytes, or a path (read only as far as the header; a FIFO or device is refused
    unread). `name`: the file's name, when `source` is bytes (a camera RAW suffix is read
    by rawpy: the sensor's size, and a RAW file counts as lossless, the camera's original).
    Raises ImageError when it is not an image Pillow can identify."""
    name = source if name is None and not isinstance(source, bytes) else name
    try:
        if name is not None and Path(name).suffix.lower() in RAW_SUFFIXES:
            rawpy = optional_module("rawpy", "raw")
            if rawpy is not None:
                return _raw_facts(rawpy, source)
        if isinstance(source, bytes):
            return _facts_of(io.BytesIO(source))
        with open_regular(source) as (fh, _):
            return _facts_of(fh)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read") from None
    except Exception as exc:  # a damaged header: one line, never a traceback
        raise ImageError(f"cannot read the image header: {first_line(exc)}") from None


def _facts_of(fh) -> HeaderFacts:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Parses the header; no pixel is decoded. Only the formats scans index are tried.
        with Image.open(fh, formats=pillow_formats()) as img:
            width, height = img.size
            fmt = img.format
            try:
                orientation = img.getexif().get(ExifTags.Base.Orientation)
            except Exception:  # an unreadable EXIF block: the stored orientation
                orientation = None
            compression = str(img.info.get("compression", "")).lower()
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    if fmt == "WEBP":
        fh.seek(0)
        lossless = _webp_is_lossless(fh.read(_WEBP_PROBE_BYTES))
    elif fmt == "TIFF":
        lossless = compression not in _LOSSY_TIFF
    else:
        lossless = fmt in LOSSLESS_FORMATS
    return HeaderFacts(width, height, fmt, lossless)


def _raw_facts(rawpy, source: bytes | str | os.PathLike) -> HeaderFacts:
    """The displayed sensor size of a camera RAW file (LibRaw reads the header only)."""
    if not isinstance(source, bytes):
        source = read_image_file(source)  # LibRaw reads from memory; the size limit holds
    with rawpy.imread(io.BytesIO(source)) as raw:
        sizes = raw.sizes
        width, height = sizes.width, sizes.height
        if sizes.flip in (5, 6):  # LibRaw's quarter turns
            width, height = height, width
    return HeaderFacts(width, height, "RAW", True)


def _webp_is_lossless(head: bytes) -> bool:
    """True when a WebP file's image chunk is VP8L (lossless), not VP8 (lossy)."""
    at = 12  # after "RIFF", the size and "WEBP"
    while at + 8 <= len(head):
        fourcc = head[at : at + 4]
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        size = int.from_bytes(head[at + 4 : at + 8], "little")
        at += 8 + size + (size & 1)  # chunks are padded to an even length
    return False
