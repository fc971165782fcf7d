"""Reading an image file within bounds and decoding it safely to upright 8-bit RGB: the
memory budget checked from the header, EXIF orientation, camera RAW through rawpy."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from simsearch.config import MAX_DECODE_BYTES, MAX_FILE_BYTES, MAX_IMAGE_PIXELS, RAW_SUFFIXES
from simsearch.errors import ImageError, first_line
from simsearch.media.formats import optional_module, pillow_formats

log = logging.getLogger(__name__)

# Colour that transparent pixels are laid on: photo tools show transparency on white.
BACKGROUND = (255, 255, 255)


def read_image_file(path: str | os.PathLike, *, mtime_ns: int | None = None) -> bytes:
    """Return the bytes of a regular file, or raise ImageError with the reason.

    Anything else (a FIFO, socket or device named like an image) is refused unread, and so
    is a file above MAX_FILE_BYTES, and, given `mtime_ns`, a file (the one opened, links
    followed) whose modification time is not that one.
    """
    with open_regular(path) as (fh, st):
        if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
            raise ImageError("the file changed since it was indexed (index it again)")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"file is {st.st_size:,} bytes, above the limit of {MAX_FILE_BYTES:,}")
        try:
            # Ask for the size fstat gave (+1 to notice growth): read(n) allocates n bytes
            # up front, and asking for the limit would reserve 1 GiB for every photo.
            data = fh.read(st.st_size + 1)
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > st.st_size:
        # Never read on past the size the file had: a file still being written is taken
        # on the next run, and a /proc or /sys file (size 0, endless content) never.
        if st.st_size == 0:
            raise ImageError("file says it is empty but is not (a /proc or /sys file?)")
        raise ImageError("file grew while it was read (still being written?)")
    return data


@contextlib.contextmanager
def open_regular(path: str | os.PathLike):
    """Yield (binary file object, its stat) for a regular file, or raise ImageError with
    the reason: a FIFO, socket or device named like an image is refused without waiting."""
    try:
        # O_NONBLOCK: opening a FIFO named like an image must not wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except PermissionError:
        raise ImageError("permission denied: cannot read the file") from None
    except FileNotFoundError:
        raise ImageError("file disappeared before it could be read") from None
    except OSError as exc:
        raise ImageError(f"cannot open file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file (a FIFO, socket or device)")
        fh = os.fdopen(fd, "rb")
    except OSError as exc:
        os.close(fd)
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, st


class Draft(Protocol):
    """What decode_image asks of its `draft` argument (a Preprocessing, or the report's
    thumbnail size): the smallest size to decode an image at. A `check_resize(width,
    height)` method, where the object has one, is called too."""

    def draft_size(self, width: int, height: int) -> tuple[int, int]: ...


def decode_image(
    data: bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft: Draft | None = None,
    *,
    name: str | os.PathLike | None = None,
    max_bytes: int = MAX_DECODE_BYTES,
) -> Image.Image:
    """Return the image in `data` as upright RGB, or raise ImageError with the reason.

    The pixel count, and the bytes the decoded pixels take in their mode (`max_bytes`), are
    checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing; with `draft`, so is the size the preprocessing would resize it to (a 1x100000
    image). EXIF orientation is applied; palette, alpha, CMYK, 16-bit and float modes are
    all converted to 8-bit RGB; animations give their first frame.
    With `draft`, a JPEG much larger than that preprocessing needs is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain (Pillow's draft mode), several times faster, and any
    other image is box-reduced to that size a band of rows at a time right after decoding,
    so its conversions to RGB cost a fraction of the decode.
    Only the formats folder scans index are tried (never EPS, whatever the file is called).
    `name`: the file's name; a camera RAW suffix sends it through rawpy, when installed.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if name is not None and Path(name).suffix.lower() in RAW_SUFFIXES:
        rawpy = optional_module("rawpy", "raw")
        if rawpy is not None:
            return _decode_raw(rawpy, data, max_pixels, draft)
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=pillow_formats())
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the limit "
                    f"of {max_pixels:,} pixels"
                )
            check_resize = getattr(draft, "check_resize", None)  # a model's preprocessing
            if check_resize is not None:
                check_resize(width, height)
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft.draft_size(width, height))
            cost = decoded_bytes(img.mode, *img.size)
            if cost > max_bytes:
                raise ImageError(
                    f"image is {width}x{height} {img.mode}: decoding it takes "
                    f"{cost / 2**20:,.0f} MiB, above the limit of {max_bytes / 2**20:,.0f} MiB"
                )
            img.load()
            orientation = _orientation(img)
            if draft is not None:
                img = _reduced(img, draft)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses images far above its own limit as soon as it reads the header.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,}" if found else "more"
        raise ImageError(
            f"image is {count} pixels, above the limit of {max_pixels:,} pixels "
            "(a possible decompression bomb)"
        ) from None
    except Exception as exc:  # Pillow raises many types for bad data; all mean "cannot decode"
        raise ImageError(f"cannot decode image: {first_line(exc)}") from None
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    turn = None if orientation is None else _EXIF_TURNS.get(orientation)
    if turn is not None:
        img = img.transpose(turn)
    return to_rgb(img)


# Bytes a pixel takes in Pillow's storage, by mode: 8-bit single-band modes one, 16-bit
# ones two, and every multi-band or 32-bit mode four (RGB is stored as four bytes too).
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Return the bytes an image of `mode` and size takes once Pillow has decoded it."""
    if mode in _ONE_BYTE_MODES:
        per = 1
    elif mode.startswith("I;16"):
        per = 2
    else:
        per = 4
    return per * width * height


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception as exc:  # a corrupt EXIF block should not lose an otherwise good image
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return None


# Rows of the source reduced at a time: the band's converted copy is all the extra memory.
_REDUCE_BAND_BYTES = 16 << 20


def _reduced(img: Image.Image, draft: Draft) -> Image.Image:
    """Return `img` box-reduced by the largest integer factor that keeps it at least the
    size `draft` decodes JPEGs at (what Pillow's JPEG draft does in the DCT domain), a band
    of rows at a time, or `img` itself when it is not twice that size. Modes that Pillow
    cannot reduce (16-bit, palette, bilevel) are converted a band at a time on the way."""
    width, height = img.size
    # draft_size already allows for the EXIF turn that follows (see there).
    want_w, want_h = draft.draft_size(width, height)
    factor = min(width // max(1, want_w), height // max(1, want_h))
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        mode = "I"
    elif img.mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
    elif img.mode == "1":
        mode = "L"
    else:
        mode = img.mode
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    band = max(1, _REDUCE_BAND_BYTES // max(1, 4 * width) // factor) * factor
    for top in range(0, height, band):
        piece = img.crop((0, top, width, min(height, top + band)))
        if piece.mode != mode:
            piece = piece.convert(mode)
        out.paste(piece.reduce(factor), (0, top // factor))
    return out


def _decode_raw(rawpy, data: bytes, max_pixels: int, draft) -> Image.Image:
    """Return a camera RAW file as upright RGB: its embedded preview where it has one (a
    camera's own rendering, and no demosaicing), else LibRaw's half-size development.

    The sensor's dimensions are checked against `max_pixels` before anything is unpacked,
    so a RAW file claiming a huge sensor costs only its header; a JPEG preview goes through
    decode_image, with its own header check.
    """
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            width, height = sizes.raw_width, sizes.raw_height
            if width * height > max_pixels:
                raise ImageError(
                    f"camera RAW sensor is {width}x{height} = {width * height:,} pixels, "
                    f"above the limit of {max_pixels:,} pixels"
                )
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                # The preview carries no orientation of its own; LibRaw's flip says it.
                return _flipped(decode_image(thumb.data, max_pixels, draft), sizes.flip)
            if thumb is not None and thumb.format == rawpy.ThumbFormat.BITMAP:
                return _flipped(to_rgb(Image.fromarray(thumb.data)), sizes.flip)
            # postprocess applies the flip itself. half_size: a quarter of the pixels,
            # no interpolation, plenty for a 224-px model input.
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
            return Image.fromarray(rgb).convert("RGB")
    except ImageError:
        raise
    except rawpy.LibRawError as exc:
        raise ImageError(f"cannot decode camera RAW: {first_line(exc)}") from None
    except Exception as exc:  # LibRaw raises plain errors too for truncated files
        raise ImageError(f"cannot decode camera RAW: {first_line(exc)}") from None


# LibRaw's flip codes for the rotation a preview needs (0: none).
_FLIPS = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.ROTATE_90,
    6: Image.Transpose.ROTATE_270,
}


def _flipped(img: Image.Image, flip: int) -> Image.Image:
    turn = _FLIPS.get(flip)
    return img if turn is None else img.transpose(turn)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer or float greyscale to 8 bits by the range its type implies."""
    arr = np.asarray(img)
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f":
        if lo >= 0 and hi <= 1:  # the usual convention for float images
            lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 65535:  # 16-bit data, whatever container Pillow chose for it
        lo, hi = 0.0, 65535.0
    scaled = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
