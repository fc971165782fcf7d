"""Crash points for fault-injection tests: the process kills itself where a test asks it to.

A test sets SIMSEARCH_CRASH_AT=<point>:<n> (e.g. "commit:3") in a child process; the n-th
time that process passes `crash_point("<point>")`, it sends itself SIGKILL, as a power cut or
the OOM killer would. With the variable unset (always, outside tests) a crash point costs a
dictionary lookup.

SIMSEARCH_PAUSE_AT=<point>:<n>:<file> instead pauses there: the process writes
`<file>.paused` and waits (up to PAUSE_SECONDS) until `<file>` exists, so a test can look
at the index at exactly that moment of a run, then let it go on.

SIMSEARCH_CRASH_ONCE=<point>:<n>:<file> kills the process at its n-th pass of
`crash_once("<point>")`, once in all processes that share `<file>` (the first to create it):
a Ray worker dies mid-run and its retry, in a restarted worker, goes on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "SIMSEARCH_CRASH_AT"
PAUSE_ENV = "SIMSEARCH_PAUSE_AT"
ONCE_ENV = "SIMSEARCH_CRASH_ONCE"
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
_once_point, _, _once_rest = (os.environ.get(ONCE_ENV) or "").partition(":")
_once_count, _, _once_file = _once_rest.partition(":")
_ONCE = (_once_point, int(_once_count or 1), _once_file) if _once_point and _once_file else None


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


def crash_once(name: str) -> None:
    """Die with SIGKILL here if the environment names this point (SIMSEARCH_CRASH_ONCE) and
    no process has died here before (its file does not exist yet)."""
    if _ONCE is None or _ONCE[0] != name:
        return
    key = "once:" + name
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] != _ONCE[1]:
        return
    try:
        os.close(os.open(_ONCE[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
