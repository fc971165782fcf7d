"""Progress: what a long operation reports to, one convention for every one of them.

An operation takes `progress: Progress | None`, sets its total once it knows it
(`set_total`) and advances it as work is done (`advance`); None reports nowhere. A tqdm bar
is a Progress, and so is anything with `total`, `update(n)` and `refresh()`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    total: float | None

    def update(self, n: float = 1) -> object: ...

    def refresh(self) -> object: ...


class NullProgress:
    """A Progress that reports nowhere."""

    total: float | None = None

    def update(self, n: float = 1) -> None:
        return None

    def refresh(self) -> None:
        return None


def set_total(progress: Progress | None, total: float) -> None:
    """Say how much work there is (and show it at once)."""
    if progress is not None:
        progress.total = total
        progress.refresh()


def advance(progress: Progress | None, n: float = 1) -> None:
    """Count `n` more units of work done."""
    if progress is not None:
        progress.update(n)


def describe(progress: Progress | None, text: str) -> None:
    """Name the stage the work is in, where the progress shows a description (tqdm does)."""
    if progress is not None and hasattr(progress, "set_description"):
        progress.set_description(text)
