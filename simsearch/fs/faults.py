"""Crash points for fault-injection tests: the process kills itself where a test asks it to.

A test sets SIMSEARCH_CRASH_AT=<point>:<n> (e.g. "commit:3") in a child process; the n-th
time that process passes `crash_point("<point>")`, it sends itself SIGKILL, as a power cut or
the OOM killer would. With the variable unset (always, outside tests) a crash point costs a
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SIMSEARCH_CRASH_AT"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    point, _, count = value.partition(":")
    return point, int(count or 1)


_TARGET = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die with SIGKILL here if this is the crash point (and pass) the environment names."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
