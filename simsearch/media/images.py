"""Finding image files, decoding them safely to RGB, and turning them into model input."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import re
import stat
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import ExifTags, Image, ImageFile

from simsearch.config import (
    DRAFT_OVERSAMPLE,
    MAX_DECODE_BYTES,
    MAX_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_RESIZED_BYTES,
    OTHER_SUFFIXES,
    RAW_SUFFIXES,
    SKIPPED_SUFFIXES_KEPT,
    UNINDEXED_FORMATS,
)
from simsearch.errors import ImageError, InputPathError, first_line

log = logging.getLogger(__name__)

# Colour that transparent pixels are laid on: photo tools show transparency on white.
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class _Formats:
    suffixes: frozenset[str]  # lower case, with the dot
    names: tuple[str, ...]  # Pillow format names decode_image lets Image.open try


_formats: _Formats | None = None
_formats_lock = threading.Lock()


def _registry() -> _Formats:
    """Return what the installed Pillow (with pillow-heif, if installed) opens, worked out
    once: the optional openers are registered on first use, not at import."""
    global _formats
    if _formats is not None:  # every decode asks: no lock once it is known
        return _formats
    with _formats_lock:
        if _formats is None:
            heif = _optional("pillow_heif", "heic")
            if heif is not None:
                heif.register_heif_opener()
            Image.init()
            names = {
                name
                for name, (factory, _) in Image.OPEN.items()
                if name not in UNINDEXED_FORMATS
                and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
            }
            # MPO (multi-picture JPEG, from 3D and some phone cameras) has no opener of its
            # own: Pillow's JPEG opener returns an MpoImageFile when it finds the MP header.
            indexed = names | ({"MPO"} if "JPEG" in names else set())
            registered = Image.registered_extensions()
            suffixes = {ext for ext, name in registered.items() if name in indexed}
            if _optional("rawpy", "raw") is not None:
                suffixes |= RAW_SUFFIXES
            # In Pillow's own order (the common formats first): Image.open tries them in turn.
            ordered = tuple(name for name in Image.ID if name in names)
            _formats = _Formats(frozenset(suffixes), ordered)
        return _formats


@functools.cache  # a failed import is not cached by Python: warn once, not per file
def _optional(module: str, extra: str):
    """Return an optional decoder's module, or None when it is not installed or cannot load
    (a broken install costs its formats, with one warning, not every decode)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
    except Exception as exc:
        log.warning("%s (simsearch[%s]) is installed but cannot load: %s", module, extra, exc)
        return None


def image_suffixes() -> frozenset[str]:
    """Return the file suffixes folder scans index: every one that the installed Pillow
    registers for a format it can open (HEIC/HEIF too with pillow-heif, camera RAW with
    rawpy), less config.UNINDEXED_FORMATS."""
    return _registry().suffixes


def is_image_name(path: Path) -> bool:
    """Return True when the file name has one of the image suffixes we index."""
    return path.suffix.lower() in image_suffixes()


def find_images(
    paths: Iterable[str | os.PathLike],
    unlisted: list[Path] | None = None,
    skipped: dict[str, Counter] | None = None,
) -> Iterator[Path]:
    """Yield image files under `paths`, depth first in sorted order, each once.

    A directory is searched recursively (symlinked directories are not followed, so a link
    loop cannot trap the walk); a file named directly is yielded whatever its suffix.
    Directories that cannot be listed are logged and, if `unlisted` is given, appended to it.
    If `skipped` is given, each root folder that holds files but none with a suffix we
    index is added to it (as a str) with a Counter of those files' suffixes ("" for none).
    """
    seen: set[str] = set()
    for root in paths:
        root = Path(os.path.abspath(root))
        left_out: Counter | None = None
        if root.is_dir():
            left_out = Counter()
            candidates = _walk(root, unlisted, left_out)
        elif root.exists() or root.is_symlink():
            candidates = iter([root])
        else:
            raise InputPathError(f"no such file or directory: {root}")
        found = False
        for path in candidates:
            found = True
            key = str(path)
            if key not in seen:
                seen.add(key)
                yield path
        if not found and skipped is not None and left_out:
            skipped[str(root)] = left_out


def _walk(root: Path, unlisted: list[Path] | None, skipped: Counter) -> Iterator[Path]:
    def on_error(err: OSError) -> None:
        log.warning("cannot list %s: %s", err.filename, err.strerror)
        if unlisted is not None and err.filename:
            unlisted.append(Path(os.fsdecode(err.filename)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if is_image_name(path):
                yield path
            else:
                suffix = path.suffix.lower()
                if suffix in skipped or len(skipped) < SKIPPED_SUFFIXES_KEPT:
                    skipped[suffix] += 1
                else:
                    skipped[OTHER_SUFFIXES] += 1


def read_image_file(path: str | os.PathLike) -> bytes:
    """Return the bytes of a regular file, or raise ImageError with the reason.

    Anything else (a FIFO, socket or device named like an image) is refused unread, and so
    is a file above MAX_FILE_BYTES.
    """
    with _open_regular(path) as (fh, st):
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
def _open_regular(path: str | os.PathLike):
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
        rawpy = _optional("rawpy", "raw")
        if rawpy is not None:
            return _decode_raw(rawpy, data, max_pixels, draft)
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=_registry().names)
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
            rawpy = _optional("rawpy", "raw")
            if rawpy is not None:
                return _raw_facts(rawpy, source)
        if isinstance(source, bytes):
            return _facts_of(io.BytesIO(source))
        with _open_regular(source) as (fh, _):
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
        with Image.open(fh, formats=_registry().names) as img:
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


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's image-processor settings, applied with Pillow and numpy.

    Follows transformers' image processors: resize (to an exact size, or the shortest edge
    to `size`), optional centre crop, rescale to [0, 1], normalise by mean and std.
    """

    resize: str  # "exact" (to height x width) or "shortest_edge"
    size: tuple[int, ...]  # (height, width) for exact, (edge,) for shortest_edge
    resample: int  # a PIL.Image.Resampling value, as the configs store it
    crop: tuple[int, int] | None  # (height, width) of the centre crop, or None
    rescale_factor: float | None  # None: no rescaling
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, proc) -> Preprocessing:
        """Read the settings of a transformers image processor."""
        size = dict(getattr(proc, "size", None) or {})
        dims: tuple[int, ...]
        if not getattr(proc, "do_resize", True):
            resize, dims = "none", ()
        elif "height" in size and "width" in size:
            resize, dims = "exact", (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            resize, dims = "shortest_edge", (int(size["shortest_edge"]),)
        else:
            raise ImageError(f"unsupported image processor size setting: {size}")
        crop = None
        if getattr(proc, "do_center_crop", False):
            cs = dict(getattr(proc, "crop_size", None) or {})
            crop = (int(cs["height"]), int(cs["width"]))
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None
        mean = std = None
        if getattr(proc, "do_normalize", True):
            mean = tuple(float(x) for x in proc.image_mean)
            std = tuple(float(x) for x in proc.image_std)
        resample = getattr(proc, "resample", Image.Resampling.BILINEAR)
        return cls(resize, dims, int(resample), crop, rescale, mean, std)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Rebuild the settings that `to_dict` wrote (as a manifest stores them)."""
        return cls(
            resize=d["resize"],
            size=tuple(d["size"]),
            resample=int(d["resample"]),
            crop=None if d["crop"] is None else tuple(d["crop"]),
            rescale_factor=d["rescale_factor"],
            mean=None if d["mean"] is None else tuple(d["mean"]),
            std=None if d["std"] is None else tuple(d["std"]),
        )

    def to_dict(self) -> dict:
        """Return a JSON-friendly dict (lists, not tuples) for the manifest."""
        return json_ready(asdict(self))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) the image will have after resizing, before cropping."""
        if self.resize == "exact":
            return self.size[1], self.size[0]
        if self.resize == "shortest_edge":
            edge = self.size[0]
            if width <= height:
                return edge, int(edge * height / width)
            return int(edge * width / height), edge
        return width, height

    def check_resize(self, width: int, height: int) -> None:
        """Raise ImageError when resizing a width x height image for the model would take
        more than MAX_RESIZED_BYTES (a shortest-edge resize of a very thin image)."""
        new_w, new_h = self.output_size(width, height)
        cost = 16 * new_w * new_h  # 8-bit RGB as Pillow stores it, and its float32 copy
        if cost > MAX_RESIZED_BYTES:
            raise ImageError(
                f"image is {width}x{height}: too thin for this model's resize to "
                f"{new_w}x{new_h} (aspect ratio above {self._max_aspect():,.0f}:1)"
            )

    def _max_aspect(self) -> float:
        edge = self.size[0] if self.size else 1
        return MAX_RESIZED_BYTES / 16 / max(1, edge * edge)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the smallest (width, height) a JPEG may be decoded at for this preprocessing.

        DRAFT_OVERSAMPLE times the resize target. A shortest-edge target does not depend on
        orientation; a non-square exact target might, after the EXIF rotation that follows
        decoding, so its larger side is asked for both ways.
        """
        target_w, target_h = self.output_size(width, height)
        if self.resize == "exact" and target_w != target_h:
            target_w = target_h = max(target_w, target_h)
        return DRAFT_OVERSAMPLE * target_w, DRAFT_OVERSAMPLE * target_h

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Return the model input for an RGB image: float32, channels first (3, H, W)."""
        self.check_resize(*img.size)
        new_w, new_h = self.output_size(*img.size)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.uint8)
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        out = arr.astype(np.float32)
        if self.rescale_factor is not None:
            out *= np.float32(self.rescale_factor)
        if self.mean is not None:
            out -= np.asarray(self.mean, dtype=np.float32)
            out /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre-crop an (H, W, C) array as transformers does, zero-padding when it is smaller."""
    h, w = arr.shape[:2]
    if h < crop_h or w < crop_w:
        padded = np.zeros((max(h, crop_h), max(w, crop_w), arr.shape[2]), dtype=arr.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return arr[top : top + crop_h, left : left + crop_w]


def json_ready(value):
    """Return `value` with tuples turned into lists, so it equals its own JSON round trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def embed_in_batches(embedder, images) -> np.ndarray:
    """Return `embedder`'s unit-norm float32 row for each RGB PIL image, preprocessed and
    embedded `embedder.batch_size` at a time (any object with `preprocess`, `embed_pixels`,
    `batch_size` and `dim`: the torch and the ONNX Runtime embedders)."""
    out = [np.empty((0, embedder.dim), dtype=np.float32)]
    for start in range(0, len(images), embedder.batch_size):
        chunk = images[start : start + embedder.batch_size]
        out.append(embedder.embed_pixels(np.stack([embedder.preprocess(img) for img in chunk])))
    return np.concatenate(out)
