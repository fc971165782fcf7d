"""One model, many clients: queries that need the model are collected for a short window
and embedded in one batch, so that throughput grows with the number of clients instead of
each request paying a forward pass of its own."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# How long the batcher waits, after the first image of a batch arrives, for more to join
# it. 10 ms is small next to one forward pass (~50 ms for ViT-S on two cores, more for
# bigger models), and long enough for requests arriving together to share it.
DEFAULT_WINDOW_S = 0.010


@dataclass
class _Job:
    images: Sequence  # PIL images
    done: Future = field(default_factory=Future)


class EmbedBatcher:
    """Embeds images for many threads through one `embed` (images -> unit rows), one batch
    at a time, in a thread of its own. `on_batch(n)` is told each batch's size."""

    def __init__(
        self,
        embed: Callable[[Sequence], np.ndarray],
        *,
        max_batch: int = 32,
        window: float = DEFAULT_WINDOW_S,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._embed = embed
        self._max_batch = max(1, max_batch)
        self._window = window
        self._on_batch = on_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="simsearch-embed", daemon=True)
        self._thread.start()

    def embed(self, images: Sequence, timeout: float | None = None) -> np.ndarray:
        """Return one unit-norm row per image, embedded together with other callers'."""
        if not images:
            return np.empty((0, 0), np.float32)
        job = _Job(list(images))
        self._jobs.put(job)
        return job.done.result(timeout)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch, size = [first], len(first.images)
            deadline = time.monotonic() + self._window
            stop = False
            while size < self._max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._jobs.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                size += len(job.images)
            self._embed_batch(batch, size)
            if stop:
                return

    def _embed_batch(self, batch: list[_Job], size: int) -> None:
        images = [image for job in batch for image in job.images]
        try:
            vectors = self._embed(images)
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].done.set_exception(exc)
                return
            # One request's images must not fail the others batched with them: each is
            # tried again alone, and only the one at fault gets the error.
            log.info("a batch of %d requests failed (%s); trying each alone", len(batch), exc)
            for job in batch:
                self._embed_batch([job], len(job.images))
            return
        if self._on_batch is not None:
            self._on_batch(size)
        start = 0
        for job in batch:
            job.done.set_result(vectors[start : start + len(job.images)])
            start += len(job.images)
