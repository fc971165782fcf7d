"""The ingestion pipeline: list files, skip unchanged ones, decode in threads, embed, store."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from simsearch.config import DEFAULT_WORKERS, MAX_FILE_BYTES, PREFETCH_BATCHES
from simsearch.errors import ImageError
from simsearch.images import Preprocessing, decode_image, find_images
from simsearch.records import AddSummary
from simsearch.store import BadImage, GoodImage, Store
from simsearch.vectors import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Prepared:
    good: GoodImage | None
    pixels: np.ndarray | None
    bad: BadImage | None


def ingest(
    paths: Iterable[str | os.PathLike],
    store: Store,
    vectors: VectorIndex,
    embedder,
    *,
    workers: int = DEFAULT_WORKERS,
    progress=None,
) -> AddSummary:
    """Embed the new and changed images under `paths` into `store` and `vectors`.

    Each batch of images (and the failures met on the way) is committed to the store in one
    transaction, then mirrored into `vectors`. `embedder` needs `preprocess`,
    `embed_pixels(pixels)` and `batch_size`. `progress`, if given, is a tqdm-like object:
    its `total` is set once the files are listed and `update(n)` is called as files finish.
    """
    start = time.monotonic()
    files = list(find_images(paths))
    known = store.known_files()
    todo = []
    unchanged = 0
    for path in files:
        key = str(path)
        try:
            st = path.stat()
        except OSError as exc:
            reason = (
                "broken symbolic link: its target does not exist"
                if path.is_symlink() and not path.exists()
                else f"cannot stat file: {exc.strerror or exc}"
            )
            todo.append((key, -1, -1, reason))
            continue
        prior = known.get(key)
        if prior is not None and prior.unchanged(st):
            unchanged += 1
        else:
            todo.append((key, st.st_size, st.st_mtime_ns, None))
    if progress is not None:
        progress.total = len(todo)
        progress.refresh()

    indexed = failed = 0
    batch_size = embedder.batch_size
    window = batch_size * (PREFETCH_BATCHES + 1)
    good: list[GoodImage] = []
    pixels: list[np.ndarray] = []
    bad: list[BadImage] = []

    def flush() -> None:
        nonlocal indexed, failed
        vecs = embedder.embed_pixels(np.stack(pixels)) if pixels else np.empty((0, vectors.dim))
        ids, dropped = store.write_batch(good, vecs, bad)
        vectors.add(np.asarray(ids, dtype=np.int64), vecs)
        vectors.remove(np.asarray(dropped, dtype=np.int64))
        indexed += len(good)
        failed += len(bad)
        for b in bad:
            log.warning("skipping %s: %s", b.path, b.error)
        if progress is not None:
            progress.update(len(good) + len(bad))
        good.clear()
        pixels.clear()
        bad.clear()

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="simsearch-decode") as pool:
        items = iter(todo)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < window:
                item = next(items, None)
                if item is None:
                    return
                pending.append(pool.submit(_prepare, *item, embedder.preprocess))

        fill()
        while pending:
            prepared = pending.popleft().result()
            fill()
            if prepared.bad is not None:
                bad.append(prepared.bad)
            else:
                good.append(prepared.good)
                pixels.append(prepared.pixels)
            if len(good) >= batch_size or len(bad) >= batch_size:
                flush()
        if good or bad:
            flush()

    return AddSummary(
        seen=len(files),
        indexed=indexed,
        unchanged=unchanged,
        failed=failed,
        seconds=time.monotonic() - start,
    )


def _prepare(
    path: str, size: int, mtime_ns: int, error: str | None, preprocess: Preprocessing
) -> _Prepared:
    """Read, hash, decode and preprocess one file; any failure becomes a BadImage."""
    if error is None and not _is_utf8(path):
        error = "file name is not valid UTF-8; rename the file to index it"
    if error is not None:
        return _Prepared(None, None, BadImage(_storable(path), max(size, 0), mtime_ns, error))
    digest = None
    try:
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file is {size:,} bytes, above the limit of {MAX_FILE_BYTES:,}")
        data = _read(path)
        digest = hashlib.sha256(data).hexdigest()
        img = decode_image(data)
        arr = preprocess(img)
    except ImageError as exc:
        return _Prepared(None, None, BadImage(path, size, mtime_ns, str(exc), digest))
    except Exception as exc:  # a bug in a codec must cost one file, not the run
        log.debug("unexpected error on %s", path, exc_info=True)
        reason = f"{type(exc).__name__}: {exc}"
        return _Prepared(None, None, BadImage(path, size, mtime_ns, reason, digest))
    return _Prepared(GoodImage(path, size, mtime_ns, digest, *img.size), arr, None)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except PermissionError:
        raise ImageError("permission denied: cannot read the file") from None
    except FileNotFoundError:
        raise ImageError("file disappeared before it could be read") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(path: str) -> str:
    """Return a form of `path` that SQLite can store, escaping undecodable bytes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if not _is_utf8(path) else path
