"""Reading ahead: the next files are read and decoded in threads while the caller (the
model, mostly) works on the ones before, with a bound on the work in flight."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(
    pool: Executor, work: Callable[[T], R], items: Iterable[T], ahead: int
) -> Generator[R, None, None]:
    """Yield `work(item)` for each of `items`, in their order, computed in `pool` while the
    caller handles the results before it: at most `ahead` items are submitted and not yet
    yielded (`items` is read only as far as that).

    An exception from `work` is raised where its result would have been yielded. When the
    iteration stops early (an error, a Ctrl-C, the caller closing the generator), the items
    still queued are cancelled, never run; those already running finish, and the pool's
    shutdown waits for them. Close the generator before the pool shuts down, so that the
    queue is cancelled first: `with pool, contextlib.closing(read_ahead(pool, ...)) as it:`.
    """
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    todo = iter(items)
    pending: deque[Future[R]] = deque()

    def fill() -> None:
        for item in itertools.islice(todo, ahead - len(pending)):
            pending.append(pool.submit(work, item))

    try:
        fill()
        while pending:
            result = pending.popleft().result()
            fill()
            yield result
    finally:
        for future in pending:  # on Ctrl-C or an error, do not run what is queued
            future.cancel()
