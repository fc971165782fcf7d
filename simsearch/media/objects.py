"""Images in object storage (s3://bucket/prefix, gs://..., any URL pyarrow's file systems
open): listed, read with the same bounds as local files, never written or deleted.

An object's path as the index stores it is its URL. Change detection is by size and last
modification time, as for files: S3 objects are immutable, so an object overwritten has a
new LastModified (and ETag); the content itself is identified by its SHA-256, as a file's.

Credentials and the endpoint come from the environment as the AWS SDK reads them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for an
S3-compatible server such as MinIO): nothing is passed in a URL, so none is stored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, TypeGuard

from simsearch.config import MAX_FILE_BYTES
from simsearch.errors import ImageError, InputPathError
from simsearch.media.formats import is_image_name

# A URL with a scheme of two letters or more (so a Windows drive, C:/, is a path).
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")

INSTALL_HINT = "pip install 'simsearch[s3]'"


def is_url(path: object) -> TypeGuard[str]:
    """True for an object-store URL (s3://...), False for a file path."""
    return isinstance(path, str) and _URL.match(path) is not None


@functools.lru_cache(maxsize=16)
def _filesystem(scheme_and_bucket: str):
    try:
        from pyarrow import fs
    except ImportError:
        raise InputPathError(
            f"object-store URLs need pyarrow, which is not installed: {INSTALL_HINT}",
            path=scheme_and_bucket,
        ) from None
    try:
        return fs.FileSystem.from_uri(scheme_and_bucket)[0]
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... by scheme
        raise InputPathError(
            f"cannot open {scheme_and_bucket}: {exc}", path=scheme_and_bucket
        ) from None


def _split(url: str) -> tuple[Any, str]:
    """(file system, path inside it) for a URL: s3://bucket/key -> (S3, "bucket/key")."""
    scheme, _, rest = url.partition("://")
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest.rstrip("/")


def list_objects(url: str) -> Iterator[tuple[str, int, int]]:
    """Yield (URL, size, mtime_ns) of every object under the prefix `url` named as an
    image (the suffixes a folder scan takes), or of `url` itself if it is an object, in
    sorted order. InputPathError when it cannot be listed (no such bucket, no permission)."""
    from pyarrow import fs as pafs

    filesystem, path = _split(url)
    scheme = url.partition("://")[0]
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            entries = [info]
        else:
            entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as exc:
        raise InputPathError(f"cannot list {url}: {exc}", path=url) from None
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.type != pafs.FileType.File:
            continue
        if entry.path != path and not is_image_name(PurePosixPath(entry.path)):
            continue
        mtime_ns = entry.mtime_ns if entry.mtime_ns is not None else 0
        yield f"{scheme}://{entry.path}", int(entry.size), int(mtime_ns)


def read_object(url: str) -> bytes:
    """Return an object's bytes, or raise ImageError with the reason; an object above
    MAX_FILE_BYTES is refused unread, and one that is longer than it said, as a file is."""
    filesystem, path = _split(url)
    try:
        size = filesystem.get_file_info(path).size
        if size is None:
            raise ImageError("no such object")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"object is {size:,} bytes, above the limit of {MAX_FILE_BYTES:,}")
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(size + 1)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot read object: {exc}") from None
    if len(data) != size:
        raise ImageError("object changed while it was read (overwritten?)")
    return data
