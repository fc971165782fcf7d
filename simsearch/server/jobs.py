"""The server's background index run: one at a time, over the index's own folders, in a
thread with its own `Index` (the writer), while the server's reader keeps answering. Its
progress is a snapshot any request can read, and a version number that changes with it, so
that a client can follow it by polling or as server-sent events."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)


class _Progress:
    """A Progress (simsearch.progress) that writes into the job's snapshot."""

    def __init__(self, job: IndexJob) -> None:
        self._job = job
        self.total: float | None = None

    def update(self, n: float = 1) -> None:
        self._job._changed(done=self._job.state["done"] + int(n))

    def refresh(self) -> None:
        self._job._changed(total=None if self.total is None else int(self.total))


class IndexJob:
    """Runs `run(progress)` (an `Index.add` over the index's folders) in a thread, once at
    a time; `state` is what a client sees of it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self.version = 0
        self.state: dict[str, Any] = {
            "running": False,
            "done": 0,
            "total": None,
            "started": None,
            "finished": None,
            "summary": None,
            "error": None,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.state, "version": self.version}

    def start(self, run: Callable[[_Progress], object]) -> bool:
        """Start a run; False when one is already running."""
        with self._lock:
            if self.state["running"]:
                return False
            self.state.update(
                running=True, done=0, total=None, started=time.time(), finished=None,
                summary=None, error=None,
            )  # fmt: skip
            self.version += 1
            self._lock.notify_all()
            self._thread = threading.Thread(
                target=self._work, args=(run,), name="simsearch-index", daemon=True
            )
            self._thread.start()
        return True

    def wait(self, version: int, timeout: float) -> dict[str, Any]:
        """The snapshot once its version differs from `version` (or after `timeout`)."""
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout)
            return {**self.state, "version": self.version}

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _changed(self, **values) -> None:
        with self._lock:
            self.state.update(values)
            self.version += 1
            self._lock.notify_all()

    def _work(self, run: Callable[[_Progress], object]) -> None:
        summary, error = None, None
        try:
            result = run(_Progress(self))
            summary = _as_dict(result)
        except SimsearchError as exc:
            error = str(exc)
        except Exception as exc:  # reported to clients; the server keeps serving
            log.exception("the background index run failed")
            error = f"the index run failed: {type(exc).__name__}: {exc}"
        self._changed(running=False, finished=time.time(), summary=summary, error=error)


def _as_dict(result: object) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result
