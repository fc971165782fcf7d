"""Crash points for fault-injection tests: the process kills itself where a test asks it to.

A test sets SIMSEARCH_CRASH_AT=<point>:<n> (e.g. "commit:3") in a child process; the n-th
time that process passes `crash_point("<point>")`, it sends itself SIGKILL, as a power cut or
the OOM killer would. With the variable unset (always, outside tests) a crash point costs a
dictionary lookup.

SIMSEARCH_PAUSE_AT=<point>:<n>:<file> instead pauses there: the process writes
`<file>.paused` and waits (up to PAUSE_SECONDS) until `<file>` exists, so a test can look
at the index at exactly that moment of a run, then let it go on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "SIMSEARCH_CRASH_AT"
PAUSE_ENV = "SIMSEARCH_PAUSE_AT"
PAUSE_SECONDS = 120.0


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    point, _, count = value.partition(":")
    return point, int(count or 1)


_TARGET = _parse(os.environ.get(ENV))
_point, _, _go = (os.environ.get(PAUSE_ENV) or "").partition(":")
_count, _, _file = _go.partition(":")
_PAUSE = (_point, int(_count or 1), Path(_file)) if _point and _file else None
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die with SIGKILL here if this is the crash point (and pass) the environment names;
    or pause here, if that is what it names."""
    if _PAUSE is not None and _PAUSE[0] == name:
        _pause(name, *_PAUSE[1:])
    if _TARGET is None or _TARGET[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(name: str, count: int, go: Path) -> None:
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != count:
        return
    go.with_name(go.name + ".paused").touch()
    deadline = time.monotonic() + PAUSE_SECONDS
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
