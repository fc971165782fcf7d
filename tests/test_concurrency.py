"""One writer at a time, stale locks taken over, and searches that keep working meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import draw_image, index_command, subprocess_env

from simsearch import Index
from simsearch.errors import IndexLockedError
from simsearch.fs.lock import WriteLock


@pytest.fixture
def short_wait(monkeypatch):
    monkeypatch.setattr("simsearch.config.LOCK_WAIT_SECONDS", 0.2)


def test_a_second_writer_is_told_who_holds_the_lock(index_path, photo_dir, short_wait):
    with WriteLock(index_path), Index.open(index_path) as idx:
        with pytest.raises(IndexLockedError, match=f"locked by pid {os.getpid()}"):
            idx.add(photo_dir)
        with pytest.raises(IndexLockedError):
            idx.repair()
        # Readers are not blocked.
        assert idx.search("id:1", k=1)[0].id == 1
    with Index.open(index_path) as idx:
        assert idx.add(photo_dir).unchanged == 8  # free again


def test_a_writer_waits_for_a_lock_held_briefly(index_path, photo_dir):
    """A search that saved a rebuilt FAISS file holds the lock for a moment; no error."""
    import threading

    lock = WriteLock(index_path)
    lock.acquire()
    threading.Timer(0.5, lock.release).start()
    with Index.open(index_path) as idx:
        assert idx.add(photo_dir).unchanged == 8


@pytest.mark.e2e
def test_a_lock_left_by_a_killed_process_is_taken_over(index_path, photo_dir, short_wait):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from simsearch.fs.lock import WriteLock; "
            f"WriteLock({str(index_path)!r}).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with Index.open(index_path) as idx:
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            idx.add(photo_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (index_path / "index.lock").read_text().strip() == str(holder.pid)
        assert idx.add(photo_dir).unchanged == 8


@pytest.mark.e2e
def test_searches_stay_consistent_while_a_writer_runs(tmp_path, tiny_vit):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(300):
        draw_image(200 + i, size=(40, 32)).save(photos / f"q{i:04d}.png")
    index_path = tmp_path / "live"
    with Index.create(index_path, model=tiny_vit) as idx:
        idx.add(photos / "q0000.png")  # something to search from the start
    # The writer pauses after its 10th commit (80 of 300 images, the FAISS file not yet
    # mirrored): the readers must answer then, from committed state, not only before or after.
    go = tmp_path / "go"
    writer = subprocess.Popen(
        index_command(photos, index_path, "--batch-size", 8),
        env=subprocess_env(SIMSEARCH_PAUSE_AT=f"after-commit:10:{go}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    answers, sizes, during = 0, [], []
    long_lived = Index.open(index_path)
    try:
        while writer.poll() is None or answers < 5:
            paused = (tmp_path / "go.paused").exists() and not go.exists()
            with Index.open(index_path) as fresh:  # a new `simsearch search` each time
                for idx in (fresh, long_lived):
                    hits = idx.search("id:1", k=20)
                    assert hits[0].id == 1 and hits[0].score == pytest.approx(1, abs=1e-4)
                    scores = [h.score for h in hits]
                    assert scores == sorted(scores, reverse=True)
                    assert len({h.id for h in hits}) == len(hits)
                    query = idx.store.vector(1)
                    for hit in hits:  # every score is the one the stored vectors give
                        stored = idx.store.vector(hit.id)
                        assert stored is not None
                        assert float(np.dot(query, stored)) == pytest.approx(hit.score, abs=1e-4)
                sizes.append(len(fresh.vectors))
                answers += 1
            if paused:
                during.append(sizes[-1])
                go.touch()  # seen mid-run: let the writer go on
            time.sleep(0.01)
    finally:
        long_lived.close()
        _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert sizes == sorted(sizes), "a reader saw the index shrink"
    assert sizes[-1] == 300
    assert during == [81], f"answers while the writer was paused mid-run: {during}"
    with Index.open(index_path) as idx:
        assert idx.verify() == []


@pytest.mark.e2e
def test_two_processes_creating_one_new_index_both_succeed(tmp_path, tiny_vit, photo_dir):
    """The second failed at once ("locked") instead of waiting like other writers, or
    raised IndexExistsError once the first had created it."""
    index = tmp_path / "new"
    command = index_command(photo_dir, index, "--model", tiny_vit)
    runs = [
        subprocess.Popen(
            command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in runs]
    assert all(code == 0 for code, _ in results), results
    with Index.open(index) as idx:
        assert len(idx) == len(list(photo_dir.iterdir())) and idx.verify() == []


def test_a_search_during_an_index_run_uses_the_saved_file_not_a_rebuild(
    tmp_path, tiny_vit, monkeypatch, caplog
):
    """Every reader rebuilt the FAISS index from the database while a writer ran (32 s a
    search at 200k HNSW vectors). Now it takes the file the writer last saved, drops what
    the writer removed since and adds what it committed since."""
    from conftest import DIM, clustered, fill

    from simsearch.search.cache import VectorCache
    from simsearch.storage.store import GoodImage

    data = clustered(3000, DIM, seed=3)
    with Index.create(tmp_path / "idx", tiny_vit, index_type="hnsw") as index:
        ids = fill(index, data[:2000])
        with index.parts.writing():
            index.parts.cache.save()
    writer = Index.open(tmp_path / "idx")
    writer.parts.folder.lock.acquire()  # an index run, between two saves of its FAISS file
    try:
        good = [GoodImage(f"/new/{i}.jpg", 1, 1, f"{10**6 + i:064x}", 8, 8) for i in range(1000)]
        new_ids, _ = writer.store.write_batch(good, data[2000:], [], [])
        writer.store.delete_vectors(ids[:5].tolist())

        def no_rebuild(self, plan=None):
            raise AssertionError("a reader rebuilt the index while a writer ran")

        monkeypatch.setattr(VectorCache, "rebuild", no_rebuild)
        with Index.open(tmp_path / "idx") as reader:
            found = reader.search_many([data[2500], data[0]], k=3)
            assert found[0][0].id == new_ids[500] and found[0][0].score == 1.0
            assert ids[0] not in {h.id for h in found[1]}
        assert "an index run is writing" in caplog.text
    finally:
        writer.close()
