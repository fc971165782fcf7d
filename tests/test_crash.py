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

import numpy as np
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


@pytest.fixture(scope="module")
def reference(photos, tiny_vit, tmp_path_factory):
    """Each photo's vector from one clean run: every resumed index must hold the same."""
    path = tmp_path_factory.mktemp("reference") / "index"
    with Index.create(path, model=tiny_vit, batch_size=BATCH) as ref:
        ref.add(photos)
        return _vectors(ref)


def _vectors(index) -> dict[str, np.ndarray]:
    ids = index.store.vector_ids().tolist()
    paths = index.store.paths(ids)
    return {paths[i]: v for i, v in index.store.vectors_by_id(ids).items()}


def _same_vectors(got: dict, want: dict) -> bool:
    """The same paths, each with the clean run's vector (to float noise: a batch cut at
    another place changes the last bits, which can swap near-tied search results)."""
    return got.keys() == want.keys() and all(
        float(np.dot(got[p], want[p])) > 1 - 1e-5 for p in want
    )


def _finish_and_compare(photos, index, tiny_vit, reference, committed):
    """Run again to the end: nothing committed is embedded again, and the index answers as
    one clean run does."""
    final = _run(photos, index, tiny_vit)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert (summary["unchanged"], summary["indexed"]) == (committed, N_IMAGES - committed)
    with Index.open(index) as idx:
        assert idx.verify() == []
        assert sorted(idx.store.known_files()) == sorted(str(p) for p in photos.iterdir())
        assert _same_vectors(_vectors(idx), reference)
        hits = idx.search(sorted(photos.iterdir())[0], k=3)
        assert hits[0].path == str(sorted(photos.iterdir())[0]) and hits[0].score == 1.0
    assert not any(index.glob("*.tmp"))


@pytest.mark.parametrize(
    ("point", "committed"),
    [
        ("listed:1", 0),  # after listing, before any work
        ("model:3", 2 * BATCH),  # during the third model batch: two batches committed
        ("commit:2", BATCH),  # inside the second transaction: it is rolled back
        ("after-commit:2", 2 * BATCH),  # committed, FAISS not yet updated
        ("faiss-write:1", N_IMAGES),  # every batch committed, killed writing the FAISS file
    ],
)
def test_a_kill_at_each_stage_keeps_what_was_committed_and_the_rerun_ends_as_one_clean_run(
    photos, tiny_vit, tmp_path, reference, point, committed
):
    index = tmp_path / "index"
    result = _run(photos, index, tiny_vit, crash_at=point)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (_committed(index) if (index / "meta.sqlite").exists() else 0) == committed
    if point.startswith("faiss-write"):
        assert any(index.glob("*.tmp")), "the half-written FAISS file should be left behind"
    _finish_and_compare(photos, index, tiny_vit, reference, committed)


def test_random_kills_while_batches_commit_only_ever_add_to_the_index(
    photos, tiny_vit, tmp_path, reference
):
    """Kills from outside at random instants while batches are being committed."""
    index = tmp_path / "index"
    rng = random.Random(7)
    history = []
    before = 0
    for _ in range(3):
        proc = subprocess.Popen(
            _index_cmd(photos, index, tiny_vit),
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None and not (index / "meta.sqlite").exists():
            time.sleep(0.005)
        _wait_for_commits(index / "meta.sqlite", before, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()
        after = _committed(index)
        history.append((f"random kill (rc {proc.returncode})", after))
        assert after >= before, history
        before = after
    _finish_and_compare(photos, index, tiny_vit, reference, before)


def test_a_kill_inside_the_prune_transaction_keeps_every_entry(photos, tiny_vit, tmp_path):
    import shutil

    mine = tmp_path / "photos"
    shutil.copytree(photos, mine)
    index = tmp_path / "index"
    assert _run(mine, index, tiny_vit).returncode == 0
    for victim in sorted(mine.iterdir())[:10]:
        victim.rename(tmp_path / victim.name)  # 10 photos go away...
    result = _run(mine, index, tiny_vit, crash_at="prune:1")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert _committed(index) == N_IMAGES  # ...and the kill inside the prune keeps them
    final = _run(mine, index, tiny_vit)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert (summary["unchanged"], summary["indexed"], summary["removed"]) == (N_IMAGES - 10, 0, 10)
    assert _committed(index) == N_IMAGES - 10


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
    total = len(list(photos.iterdir()))
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
