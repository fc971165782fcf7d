"""Which image formats are indexed: what the installed Pillow opens (with pillow-heif and
rawpy, when installed), worked out once, and the file suffixes that folder scans take."""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image, ImageFile

from simsearch.config import RAW_SUFFIXES, UNINDEXED_FORMATS

log = logging.getLogger(__name__)


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
            heif = optional_module("pillow_heif", "heic")
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
            if optional_module("rawpy", "raw") is not None:
                suffixes |= RAW_SUFFIXES
            # In Pillow's own order (the common formats first): Image.open tries them in turn.
            ordered = tuple(name for name in Image.ID if name in names)
            _formats = _Formats(frozenset(suffixes), ordered)
        return _formats


def pillow_formats() -> tuple[str, ...]:
    """Return the Pillow format names that decoding lets Image.open try, in Pillow's order
    (never EPS or a stub format, whatever the file is called)."""
    return _registry().names


@functools.cache  # a failed import is not cached by Python: warn once, not per file
def optional_module(module: str, extra: str):
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


def is_image_name(path: PurePath) -> bool:
    """Return True when the file name has one of the image suffixes we index."""
    return path.suffix.lower() in image_suffixes()
