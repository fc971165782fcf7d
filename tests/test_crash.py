"""Fault injection: `simsearch index` killed with SIGKILL at chosen and random points resumes
without losing, duplicating or recomputing committed work, and ends where one clean run ends.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import sqlite3
import subprocess
import time

import pytest
from conftest import draw_image, index_command, run_simsearch, subprocess_env

from simsearch import Index

pytestmark = pytest.mark.e2e

N_IMAGES = 240
BATCH = 16


def _index_cmd(photos, index, model):
    return index_command(photos, index, "--model", model, "--batch-size", BATCH, "--json")


def _run(photos, index, model, crash_at=None, **popen):
    env = subprocess_env(**({"SIMSEARCH_CRASH_AT": crash_at} if crash_at else {}))
    return subprocess.run(
        _index_cmd(photos, index, model),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **popen,
    )


def _committed(index_path):
    """Open the index as a user would after the crash: it must load, search and verify."""
    with Index.open(index_path) as idx:
        paths = list(idx.store.known_files())
        count = len(idx)
        if count:
            hits = idx.search("id:" + str(idx.store.vector_ids()[0]), k=3)
            assert hits and hits[0].score == pytest.approx(1, abs=1e-4)
        assert idx.verify() == []
    assert len(paths) == len(set(paths))
    return count


def _wait_for_commits(database, count, proc, timeout=120.0):
    """Return once the writer has committed past `count` vectors (or has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            if db.execute("SELECT count(*) FROM vectors").fetchone()[0] > count:
                return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash") / "photos"
    folder.mkdir()
    for i in range(N_IMAGES):
        draw_image(100 + i, size=(40, 32)).save(folder / f"p{i:04d}.png")
    return folder


def _reference(photos, tiny_vit, tmp_path):
    with Index.create(tmp_path / "reference", model=tiny_vit, batch_size=BATCH) as ref:
        ref.add(photos)
        queries = sorted(photos.iterdir())[::23]
        return {q.name: [(h.path, round(h.score, 5)) for h in ref.search(q, k=5)] for q in queries}


def test_kills_at_every_stage_then_resume_match_one_clean_run(photos, tiny_vit, tmp_path):
    index = tmp_path / "index"
    history = []

    def crash(point, expect_committed):
        result = _run(photos, index, tiny_vit, crash_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-2000:])
        count = _committed(index) if (index / "meta.sqlite").exists() else 0
        history.append((point, count))
        assert count == expect_committed, history

    crash("listed:1", 0)  # after listing, before any work
    crash("model:3", 2 * BATCH)  # during the third model batch: two batches committed
    crash("commit:2", 3 * BATCH)  # inside the second transaction: it is rolled back
    crash("after-commit:2", 5 * BATCH)  # committed, FAISS not yet updated

    # Kills from outside at random instants while batches are being committed: committed
    # work only ever grows.
    rng = random.Random(7)
    for _ in range(3):
        before = _committed(index)
        proc = subprocess.Popen(
            _index_cmd(photos, index, tiny_vit),
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_commits(index / "meta.sqlite", before, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()
        after = _committed(index)
        history.append((f"random kill (rc {proc.returncode})", after))
        assert after >= before, history

    if _committed(index) < N_IMAGES:
        crash("faiss-write:1", N_IMAGES)  # every batch committed, killed writing the FAISS file
        assert any(index.glob("*.tmp")), "the half-written FAISS file should be left behind"

    for victim in sorted(photos.iterdir())[:10]:
        victim.rename(tmp_path / victim.name)  # 10 photos go away...
    crash("prune:1", N_IMAGES)  # ...and the kill inside the prune transaction keeps them

    before_final = _committed(index)
    final = _run(photos, index, tiny_vit)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["unchanged"] == N_IMAGES - 10  # no committed image is embedded again
    assert summary["indexed"] == 0 and summary["removed"] == 10
    assert before_final == N_IMAGES

    reference = _reference(photos, tiny_vit, tmp_path)
    with Index.open(index) as idx:
        assert idx.verify() == []
        stored = sorted(idx.store.known_files())
        assert stored == sorted(str(p) for p in photos.iterdir())  # each once, all there
        got = {
            q: [(h.path, round(h.score, 5)) for h in idx.search(photos / q, k=5)] for q in reference
        }
    assert got == reference
    print("kill history (point, committed images after):", history)
    assert not any(index.glob("*.tmp"))


def test_full_disk_stops_with_a_clear_error_and_loses_nothing(photos, tiny_vit, tmp_path):
    index = tmp_path / "index"
    with Index.create(index, model=tiny_vit):
        pass
    size = (index / "meta.sqlite").stat().st_size

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 16 * 4096, size + 16 * 4096))

    full = _run(photos, index, tiny_vit, preexec_fn=limit_file_size)
    assert full.returncode == 1
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: cannot write to")
    assert "Everything committed before this is kept" in message
    committed = _committed(index)
    assert 0 < committed < N_IMAGES

    resumed = _run(photos, index, tiny_vit)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["unchanged"] == committed
    assert _committed(index) == len(list(photos.iterdir()))


def test_ctrl_c_keeps_the_index_sound_and_says_how_to_go_on(photos, tiny_vit, tmp_path):
    """After Ctrl-C, `verify` said "vectors.faiss is missing" (or stale) and exited 1
    though nothing was wrong, and the message did not say how to continue. Now Ctrl-C waits
    for the batch being committed, the index in memory is saved, and the rerun goes on."""
    index = tmp_path / "idx"
    total = len(list(photos.iterdir()))  # the kill test above moves some away
    for _ in range(2):  # on a new index, then on one that already holds vectors
        proc = subprocess.Popen(
            _index_cmd(photos, index, tiny_vit),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        before = _committed(index) if (index / "meta.sqlite").exists() else 0
        while proc.poll() is None and not (index / "meta.sqlite").exists():
            time.sleep(0.01)
        _wait_for_commits(index / "meta.sqlite", before + BATCH, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            pytest.skip("the run finished before the interrupt reached it")
        assert proc.returncode == 130, err
        assert "run the same command again" in err.strip().splitlines()[-1]
        assert "Traceback" not in err
        verify = run_simsearch("verify", "--index", index)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert before < _committed(index) < total
    assert _run(photos, index, tiny_vit).returncode == 0
    assert _committed(index) == total
