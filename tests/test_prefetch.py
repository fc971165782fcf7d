"""Reading ahead in threads: results in order, a bound on the work in flight, and nothing
queued left to run once the caller stops."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest

from simsearch.media.prefetch import read_ahead


def test_results_come_in_order_with_at_most_ahead_items_in_flight():
    submitted = []
    lock = threading.Lock()

    def items():
        for i in range(50):
            with lock:
                submitted.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        got = []
        for result in read_ahead(pool, lambda i: i * i, items(), 5):
            got.append(result)
            assert len(submitted) - len(got) <= 5
    assert got == [i * i for i in range(50)]


def test_an_error_in_the_work_is_raised_in_its_place():
    def work(i):
        if i == 3:
            raise ValueError("bad file")
        return i

    with ThreadPoolExecutor(2) as pool:
        got = []
        with pytest.raises(ValueError, match="bad file"):
            for result in read_ahead(pool, work, range(10), 4):
                got.append(result)
    assert got == [0, 1, 2]


def test_stopping_early_cancels_what_is_queued():
    release = threading.Event()
    ran = []

    def work(i):
        if i == 1:
            release.wait(10)
        ran.append(i)
        return i

    with ThreadPoolExecutor(1) as pool:
        with closing(read_ahead(pool, work, range(100), 10)) as ready:
            assert next(ready) == 0  # 1 to 10 are in flight now: 1 running (or about to)
        release.set()
    assert ran in ([0], [0, 1])  # closed: 2 to 10 were cancelled, never run


def test_ahead_must_be_at_least_one():
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError):
        next(read_ahead(pool, lambda i: i, [1], 0))
