"""File names that are not UTF-8: how they are stored, shown to people and written out.

A POSIX file name is bytes. Python hands an undecodable byte to us as a lone surrogate
(os.fsdecode's "surrogateescape": b"caf\\xe9" becomes "caf\\udce9"), and every os function
takes that str back as the real name. So in the library a path is always that str; only at
the edges does it change form:

- the store keeps a UTF-8 name as TEXT and any other name as a BLOB of its raw bytes
  (`to_column` / `from_column`): lossless, and no valid name can collide with it;
- people see the bytes escaped, `caf\\xe9.jpg` (`shown`); that text is never used to find
  the file;
- JSON output keeps the surrogate as the escape `\\udce9` (json.dumps' default), which
  Python's json.loads turns back into the str that names the real file.
"""

from __future__ import annotations

import codecs
import os
from typing import overload


def is_utf8(path: str) -> bool:
    """Return True when `path` is valid UTF-8 (has no escaped undecodable bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_column(path: str) -> str | bytes:
    """Return `path` as the store keeps it: the str if it is UTF-8, else its raw bytes."""
    return path if is_utf8(path) else os.fsencode(path)


@overload
def from_column(value: str | bytes) -> str: ...
@overload
def from_column(value: None) -> None: ...
def from_column(value: str | bytes | None) -> str | None:
    """Return the path a stored value names (bytes back to the os.fsdecode str)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def shown(path: str | os.PathLike) -> str:
    """Return `path` as people see it: valid text, undecodable bytes escaped as \\xNN."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    if is_utf8(text):
        return text
    return text.encode("utf-8", ESCAPE).decode("utf-8")


def _escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: an escaped byte (U+DC80..U+DCFF) as \\xNN, anything else that
    the stream cannot encode as backslashreplace writes it."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = []
    for char in exc.object[exc.start : exc.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(char.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out), exc.end


# The name of the codec error handler above: a text stream opened with errors=ESCAPE prints
# any path without a UnicodeEncodeError (the CLI sets it on stdout and stderr).
ESCAPE = "simsearch-escape"
codecs.register_error(ESCAPE, _escape)
