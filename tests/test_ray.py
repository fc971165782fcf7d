"""`index --ray`: the read, decode and embed stages on a Ray cluster of two nodes (started
inside the test with ray.cluster_utils), checked against a local run of the same files.

A Ray run must store what a local run stores (vectors, sizes, failures and their reasons),
reuse vectors for renamed and copied files, survive its driver killed (a rerun embeds
nothing committed again) and a worker killed mid-run (Ray retries; no file lost or stored
twice).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import draw_image, index_command, png_claiming, subprocess_env

from simsearch import Index, RaySettings
from simsearch.errors import RayError

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra (CI installs it)")
pytest.importorskip("ray.data", reason="the Ray tests need Ray Data (simsearch[ray])")

pytestmark = pytest.mark.slow

N_PHOTOS = 36


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Two Ray nodes on this machine (2 + 2 CPUs), this process connected as a driver.
    Started after the local S3 server: the nodes' workers read its AWS_* settings."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Drawn photos, a byte-identical copy, and hostile files that a run must record."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(N_PHOTOS):
        ext = "png" if i % 2 else "jpg"
        draw_image(200 + i).save(folder / ("sub" if i % 5 == 0 else "") / f"p{i:03d}.{ext}")
    shutil.copy(folder / "p001.png", folder / "copy-of-p001.png")
    (folder / "not-an-image.jpg").write_bytes(b"this is text, not a JPEG")
    (folder / "bomb.png").write_bytes(png_claiming(60_000, 60_000))
    good = (folder / "p002.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return folder


def _stored(path):
    """Everything a run stores per file: path -> (size, width, height, vector), and the
    failures: path -> reason."""
    with Index.open(path) as idx:
        store = idx.store
        known = store.known_files()
        ok = {p: k.id for p, k in known.items() if k.status == "ok"}
        vectors = store.vectors_by_id(list(ok.values()))
        facts = store.image_facts(list(ok.values()))
        stored = {p: (facts[i][3], facts[i][1], facts[i][2], vectors[i]) for p, i in ok.items()}
        failed = {f.path: f.error for f in idx.failed()}
        assert idx.verify() == []
    return stored, failed


def _same(a, b):
    (stored_a, failed_a), (stored_b, failed_b) = a, b
    assert stored_a.keys() == stored_b.keys()
    assert failed_a == failed_b
    for path, (size, w, h, vec) in stored_a.items():
        assert stored_b[path][:3] == (size, w, h), path
        np.testing.assert_allclose(stored_b[path][3], vec, atol=1e-5, err_msg=path)


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, tiny_vit, photos):
    path = tmp_path_factory.mktemp("local") / "index"
    # fp32 said outright: a module's fixture runs before the tests' fp32 default is set.
    with Index.create(path, model=tiny_vit, batch_size=8, precision="fp32") as idx:
        idx.add(photos)
    return path


def test_a_ray_run_stores_what_a_local_run_stores(cluster, tmp_path, tiny_vit, photos, local_index):
    path = tmp_path / "index"
    with Index.create(path, model=tiny_vit, batch_size=8) as idx:
        assert idx.manifest.precision == "fp32"  # which the workers use, whatever their CPU
        summary = idx.add(photos, ray=RaySettings(workers=2))
    assert (summary.indexed, summary.failed) == (N_PHOTOS + 1, 3)
    local = _stored(local_index)
    _same(local, _stored(path))
    assert set(local[1]) == {
        str(photos / n) for n in ("not-an-image.jpg", "bomb.png", "truncated.jpg")
    }

    # Unchanged files never reach the cluster; renamed and copied ones reuse their vectors.
    (photos / "p003.png").rename(photos / "renamed.png")
    shutil.copy(photos / "p004.jpg", photos / "sub" / "copy-of-p004.jpg")
    try:
        with Index.open(path) as idx:
            again = idx.add(photos, ray=RaySettings(workers=2))
            renamed = idx.store.lookup(str(photos / "renamed.png"))
        # 37 stored, one of them renamed: 36 unchanged.
        assert (again.moved, again.reused, again.unchanged) == (1, 1, N_PHOTOS)
        assert renamed is not None
    finally:
        (photos / "renamed.png").rename(photos / "p003.png")
        (photos / "sub" / "copy-of-p004.jpg").unlink()


def test_objects_in_s3_are_read_by_the_workers(cluster, s3_server, photos, tmp_path, tiny_vit):
    names = ["p001.png", "p002.jpg", "sub/p005.png", "bomb.png", "copy-of-p001.png"]
    bucket = s3_server({f"ray/{n}": (photos / n).read_bytes() for n in names})
    with Index.create(tmp_path / "local", model=tiny_vit, batch_size=2) as idx:
        idx.add(f"{bucket}/ray")
    with Index.create(tmp_path / "ray", model=tiny_vit, batch_size=2) as idx:
        summary = idx.add(f"{bucket}/ray", ray=RaySettings(workers=2))
    assert (summary.indexed, summary.failed) == (4, 1)
    _same(_stored(tmp_path / "local"), _stored(tmp_path / "ray"))


def test_settings_the_cluster_cannot_run_are_refused(cluster, tmp_path, tiny_vit, photos):
    path = tmp_path / "index"
    with Index.create(path, model=tiny_vit) as idx:
        with pytest.raises(RayError, match="take all 4 CPUs"):
            idx.add(photos, ray=RaySettings(workers=4))
        with pytest.raises(RayError, match="the Ray cluster has 0"):
            idx.add(photos, ray=RaySettings(workers=1, gpus_per_worker=1))
        assert len(idx) == 0


def test_without_ray_the_error_says_how_to_install_it(tmp_path, tiny_vit, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with (
        Index.create(tmp_path / "index", model=tiny_vit) as idx,
        pytest.raises(RayError, match=r"simsearch\[ray\]"),
    ):
        idx.add(photos, ray=RaySettings())


# -- kills: the command in another process, joining the test's cluster ----------------------


def _index_on_ray(photos, index, model, **env):
    command = index_command(photos, index, "--model", model, "--batch-size", 4, "--json")
    command += ["--ray", os.environ["RAY_TEST_ADDRESS"], "--ray-workers", "2"]
    return subprocess.run(
        command, env=subprocess_env(**env), capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def ray_address(cluster, monkeypatch):
    monkeypatch.setenv("RAY_TEST_ADDRESS", cluster.address)
    return cluster.address


@pytest.mark.e2e
def test_a_worker_killed_mid_run_loses_nothing(
    ray_address, tmp_path, tiny_vit, photos, local_index
):
    marker = tmp_path / "a-worker-died"
    index = tmp_path / "index"
    done = _index_on_ray(photos, index, tiny_vit, SIMSEARCH_CRASH_ONCE=f"ray-embed:2:{marker}")
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # a worker did die, in its second batch
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["indexed"], summary["failed"]) == (N_PHOTOS + 1, 3)
    _same(_stored(local_index), _stored(index))


@pytest.mark.e2e
def test_a_killed_driver_reruns_without_embedding_again(
    ray_address, tmp_path, tiny_vit, photos, local_index
):
    index = tmp_path / "index"
    killed = _index_on_ray(photos, index, tiny_vit, SIMSEARCH_CRASH_AT="after-commit:3")
    assert killed.returncode == -9
    with Index.open(index) as idx:
        committed = sum(k.status == "ok" for k in idx.store.known_files().values())
    assert 0 < committed < N_PHOTOS + 1

    rerun = _index_on_ray(photos, index, tiny_vit)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.splitlines()[-1])
    # What was committed is unchanged (not read, not embedded); only the rest is new (and
    # the failed files, tried again as on every run).
    assert summary["unchanged"] == committed
    assert summary["indexed"] + summary["failed"] + summary["unchanged"] == N_PHOTOS + 4
    _same(_stored(local_index), _stored(index))


@pytest.mark.e2e
def test_an_unreachable_cluster_is_one_clear_error(tmp_path, tiny_vit, photos):
    command = index_command(photos, tmp_path / "index", "--model", tiny_vit, "--ray", "127.0.0.1:9")
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "cannot connect to the Ray cluster at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr
