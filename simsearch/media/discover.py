"""Finding image files in folders, and telling which folders held files but no images."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from simsearch import config
from simsearch.config import OTHER_SUFFIXES
from simsearch.errors import InputPathError
from simsearch.media.formats import is_image_name

log = logging.getLogger(__name__)


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
                if suffix in skipped or len(skipped) < config.SKIPPED_SUFFIXES_KEPT:
                    skipped[suffix] += 1
                else:
                    skipped[OTHER_SUFFIXES] += 1
