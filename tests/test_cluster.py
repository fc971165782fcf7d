"""Clusters: planted groups are recovered, `auto` finds their number, the assignment is
stored (and forgotten for images whose vectors change), search stays inside a cluster, and
the CLI prints what people and scripts expect."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIM, fill, subprocess_env

from simsearch import Index
from simsearch.cli import cli
from simsearch.config import CLUSTER_TRAIN_MAX
from simsearch.errors import ClusterError, QueryError
from simsearch.storage.manifest import DATABASE_FILE
from simsearch.storage.store import BadImage, GoodImage

GROUPS = 20


def planted(n: int, groups: int = GROUPS, seed: int = 0, noise: float = 0.3):
    """Unit vectors in `groups` well-separated groups: random unit centres (cosine between
    centres below ~0.5 at 32 dims), each vector its centre plus noise of norm ~`noise`
    (cosine ~0.96 to it). Returns (vectors, group of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    group = rng.permutation(np.arange(n) % groups)
    x = centres[group] + noise * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), group


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement of two partitions, 1 when identical up to naming, ~0 for chance."""
    a = np.unique(a, return_inverse=True)[1].ravel()
    b = np.unique(b, return_inverse=True)[1].ravel()
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return float((x * (x - 1) // 2).sum())

    together, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (together - expected) / ((rows + cols) / 2 - expected)


def labels_of(index: Index, ids: np.ndarray) -> np.ndarray:
    """The stored cluster of each id (0: none)."""
    with sqlite3.connect(index.path / DATABASE_FILE) as db:
        stored = dict(db.execute("SELECT image_id, cluster FROM clusters"))
    return np.array([stored.get(int(i), 0) for i in ids])


@pytest.fixture(scope="module")
def grouped_template(tmp_path_factory, tiny_vit):
    """The index `grouped` copies, built once: writing 2,000 rows took 0.4 s a test."""
    data, group = planted(2_000)
    path = tmp_path_factory.mktemp("grouped") / "idx"
    with Index.create(path, tiny_vit) as index:
        ids = fill(index, data)
    return path, ids, data, group


@pytest.fixture
def grouped(tmp_path, grouped_template):
    """An index of 2,000 vectors in 20 planted groups of 100 (a fresh copy for each test)."""
    template, ids, data, group = grouped_template
    shutil.copytree(template, tmp_path / "idx")
    with Index.open(tmp_path / "idx") as index:
        yield index, ids.copy(), data.copy(), group.copy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clusters_recover_planted_groups(grouped, seed):
    index, ids, data, group = grouped
    run = index.cluster(GROUPS, seed=seed)
    assert (run.k, run.clusters, run.images, run.chosen_by) == (GROUPS, GROUPS, 2_000, "given")
    labels = labels_of(index, ids)
    assert adjusted_rand_index(group, labels) == pytest.approx(1.0)
    clusters = index.clusters(top=3)
    assert [c.id for c in clusters] == list(range(1, GROUPS + 1))
    assert [c.size for c in clusters] == [100] * GROUPS
    # The central images are the members nearest the cluster's mean direction.
    for c in clusters:
        members = data[labels == c.id]
        centre = members.mean(axis=0) / np.linalg.norm(members.mean(axis=0))
        best = ids[labels == c.id][np.argsort(-(members @ centre))[:3]]
        assert [h.id for h in c.central] == best.tolist()
        assert [h.score for h in c.central] == sorted((h.score for h in c.central), reverse=True)
        assert c.central[0].score == pytest.approx(float(data[ids == best[0]][0] @ centre), 1e-4)
        assert 0.9 < c.cohesion < c.central[0].score
    assert run.silhouette > 0.8  # tight, far-apart groups


@pytest.mark.parametrize("groups", [5, GROUPS])
def test_auto_finds_the_planted_number_of_groups(tmp_path, tiny_vit, groups):
    """On well-separated groups the best silhouette is at their number exactly (no
    tolerance): each fewer merges two groups, each more splits one."""
    data, group = planted(1_000, groups, seed=groups)
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        ids = fill(index, data)
        run = index.cluster("auto")
        assert run.k == groups and run.chosen_by.startswith("auto")
        scores = dict(run.candidates)
        assert max(scores, key=scores.get) == groups
        assert {2, 3, 4, 6, 8, 11, 16} <= set(scores)  # the grid, then around the best
        assert adjusted_rand_index(group, labels_of(index, ids)) == pytest.approx(1.0)


def test_the_assignment_survives_reopening_and_leaves_the_vector_index_alone(grouped):
    index = grouped[0]
    generation = index.store.generation()
    run = index.cluster(GROUPS)
    clusters = index.clusters()
    assert index.store.generation() == generation  # vectors unchanged: no FAISS rebuild
    assert index.verify() == []
    index.close()
    with Index.open(index.path) as again:
        assert again.clustering() == run
        assert again.clusters() == clusters
        info = again.info()
        assert info.clustering == run and info.clustered == 2_000


def test_a_new_run_replaces_the_last_one(grouped):
    index, ids, _, _ = grouped
    index.cluster(GROUPS)
    run = index.cluster(4, seed=5)
    assert (run.k, run.seed) == (4, 5)
    assert sorted(set(labels_of(index, ids).tolist())) == [1, 2, 3, 4]
    assert sum(c.size for c in index.clusters()) == 2_000
    assert index.clustering() == run


def test_search_within_a_cluster_ranks_only_its_images(grouped):
    index, ids, data, _ = grouped
    index.cluster(GROUPS)
    labels = labels_of(index, ids)
    query = data[0]
    for cluster in (labels[0], labels[1] if labels[1] != labels[0] else labels[2]):
        hits = index.search(query, k=10, cluster=int(cluster))
        inside = labels == cluster
        truth = ids[inside][np.argsort(-(data[inside] @ query))[:10]]
        assert [h.id for h in hits] == truth.tolist()
    # Combined with `within`: the intersection.
    members = ids[labels == labels[0]]
    hits = index.search(query, k=50, cluster=int(labels[0]), within=members[:5].tolist())
    assert {h.id for h in hits} == set(members[:5].tolist())
    with pytest.raises(QueryError, match=f"no cluster 21: .* clusters 1 to {GROUPS}"):
        index.search(query, cluster=21)
    with pytest.raises(QueryError, match="no cluster 0"):
        index.search(query, cluster=0)
    every = index.cluster_members(int(labels[0]))
    assert sorted(h.id for h in every) == sorted(members.tolist())
    assert [h.score for h in every] == sorted((h.score for h in every), reverse=True)
    with pytest.raises(QueryError, match="no cluster 21"):
        index.cluster_members(21)


def test_an_index_never_clustered_says_so(grouped):
    index = grouped[0]
    assert index.clustering() is None and index.clusters() == []
    info = index.info()
    assert (info.clustering, info.clustered) == (None, 0)
    with pytest.raises(QueryError, match="no clusters yet") as err:
        index.search(grouped[2][0], cluster=1)
    assert err.value.fix == "cluster"


def test_changed_failed_and_removed_images_lose_their_cluster(grouped):
    index, ids, data, _ = grouped
    index.cluster(GROUPS)
    before = labels_of(index, ids)
    # Image 0 gets new content (a new vector, same path and id); image 1 turns bad; image 4
    # is touched (new mtime, same bytes: the same vector).
    paths = index.store.paths(ids[:5])
    changed = GoodImage(paths[int(ids[0])], 2, 2, "f" * 64, 8, 8)
    assert fill(index, data[5:6], images=[changed]).tolist() == [ids[0]]
    touched = GoodImage(paths[int(ids[4])], 1, 99, f"{4:064x}", 8, 8)
    assert fill(index, data[4:5], images=[touched]).tolist() == [ids[4]]
    with index.parts.writing():
        turned_bad = BadImage(paths[int(ids[1])], 1, 3, "cannot decode")
        index.store.write_batch([], np.empty((0, DIM), np.float32), [turned_bad])
        index.store.remove_images(ids[2:4])  # deleted files
        index.parts.cache.remove(ids[1:4])
    fill(index, data[:3], start=10_000)  # new images, after the run
    after = labels_of(index, ids)
    assert after[:4].tolist() == [0, 0, 0, 0]
    assert np.array_equal(after[4:], before[4:])  # the others keep theirs
    info = index.info()
    assert (info.indexed, info.clustered) == (2_000 - 3 + 3, 2_000 - 4)
    assert sum(c.size for c in index.clusters()) == 2_000 - 4
    hits = index.search(data[0], k=2_000, cluster=int(before[0]))
    assert not {int(i) for i in ids[:4]} & {h.id for h in hits}


def test_an_index_from_before_clusters_reads_as_unclustered(grouped):
    index, data = grouped[0], grouped[2]
    path = index.path
    index.close()
    with sqlite3.connect(path / DATABASE_FILE) as db:  # as simsearch made indexes before
        db.execute("DROP TABLE clusters")
        db.execute("PRAGMA user_version = 0")  # before schema versions
    with Index.open(path) as old:
        assert old.info().clustering is None and old.clusters() == []
        with pytest.raises(QueryError, match="no clusters yet"):
            old.search(data[0], cluster=1)
        fill(old, data[:2], start=10_000)  # a write adds the table
        assert old.cluster(GROUPS).images == 2_002


@pytest.mark.parametrize(
    ("k", "message"),
    [
        (1, "k must be at least 2, not 1"),
        (0, "k must be at least 2"),
        (2_001, r"k=2001 is more clusters than the index has images \(2000\)"),
        ("many", "k must be a number of clusters or 'auto', not 'many'"),
        (2.5, "k must be a number of clusters or 'auto'"),
    ],
)
def test_bad_k_is_a_clear_error(grouped, k, message):
    with pytest.raises(ClusterError, match=message):
        grouped[0].cluster(k)


def test_too_few_images_are_clear_errors(tmp_path, tiny_vit):
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        with pytest.raises(ClusterError, match="the index holds no images"):
            index.cluster(2)
        fill(index, planted(2)[0])
        with pytest.raises(ClusterError, match="auto needs at least 3 images"):
            index.cluster("auto")
        assert index.cluster(2).clusters == 2  # K = n: every image its own cluster


@pytest.mark.slow
def test_clustering_a_million_vectors_stays_in_bounded_memory():
    """1M vectors read in chunks: they alone would take 128 MB at 32 dims (512 MB at 128);
    clustering reads at most CLUSTER_TRAIN_MAX of them at once and allocates under 80 MB
    (16 bytes per image for the assignment, the sample, one chunk, the silhouette matrix)."""
    import tracemalloc

    from simsearch.ops.cluster import cluster_vectors

    n, groups, chunk = 1_000_000, 20, 10_000
    centres = np.random.default_rng(0).standard_normal((groups, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    phase = np.random.default_rng(1).uniform(0, 2 * np.pi, DIM)

    def vectors(ids: np.ndarray) -> np.ndarray:
        # Deterministic per id, so the sample and the pass agree: group id % 20, noise ~0.3.
        noise = np.sin(ids[:, None] * (1.0 + np.arange(DIM)) * 0.618 + phase) * 0.3 * 1.4
        x = centres[ids % groups] + noise / np.sqrt(DIM)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    fetched = []

    def fetch(ids):
        fetched.append(len(ids))
        return dict(zip(ids.tolist(), vectors(ids), strict=True))

    def chunks():
        for start in range(0, n, chunk):
            ids = np.arange(start, start + chunk, dtype=np.int64)
            yield ids, vectors(ids)

    all_ids = np.arange(n, dtype=np.int64)
    tracemalloc.start()
    try:
        result = cluster_vectors(all_ids, fetch, chunks, DIM, groups)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(fetched) == result.run.trained_on <= CLUSTER_TRAIN_MAX
    assert result.run.images == n and len(result.labels) == n
    assert adjusted_rand_index(all_ids % groups, result.labels) == pytest.approx(1.0)
    assert peak < 80 * 2**20, f"clustering allocated {peak / 2**20:.0f} MB"


# -- the command line ---------------------------------------------------------------------


def test_cli_cluster_table_json_show_info_and_search(run, grouped, monkeypatch):
    index = grouped[0]
    path = index.path
    index.close()
    result = run("cluster", "--index", path, "-k", GROUPS, "--json", "--top", 2)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["cluster"] for line in lines] == list(range(1, GROUPS + 1))
    assert set(lines[0]) == {"cluster", "size", "cohesion", "central"}
    assert set(lines[0]["central"][0]) == {"id", "path", "score"}
    assert all(line["size"] == 100 and len(line["central"]) == 2 for line in lines)

    # --show prints the stored clusters and computes nothing.
    monkeypatch.setattr("simsearch.ops.cluster.cluster_vectors", lambda *a, **k: 1 / 0)
    shown = run("cluster", "--index", path, "--show", "--top", 2)
    table = shown.stdout.splitlines()
    assert table[0].startswith("cluster 1: 100 images, mean similarity to centre 0.9")
    assert table[1].split()[1] == lines[0]["central"][0]["path"]
    assert table[-1].startswith(f"{GROUPS} clusters of 2000 images (k={GROUPS} given, seed 0")
    assert len(table) == GROUPS * 3 + 1

    about = json.loads(run("info", "--index", path, "--json").stdout)
    assert about["clustered"] == 2_000 and about["clustering"]["k"] == GROUPS
    human = run("info", "--index", path).stdout
    assert f"clusters: {GROUPS} (k={GROUPS} given, seed 0, " in human
    assert "2000 images assigned" in human

    member = lines[3]["central"][0]
    found = run("search", f"id:{member['id']}", "--index", path, "--cluster", 4, "--json")
    hits = json.loads(found.stdout)["hits"]
    assert hits[0]["id"] == member["id"] and len(hits) == 10
    with Index.open(path) as again:
        inside = set(again.store.cluster_members(4).tolist())
    assert {h["id"] for h in hits} <= inside


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-k", "1"], 2, "Invalid value for '-k': 1 clusters: give at least 2, or 'auto'"),
        (["-k", "lots"], 2, "'lots' is neither a number of clusters nor 'auto'"),
        ([], 2, "give -k K (a number, or auto), or --show"),
        (["-k", "3", "--show"], 2, "--show prints the stored clusters; leave out -k"),
        (["-k", "5000"], 1, "Error: k=5000 is more clusters than the index has images (2000)"),
        (["--show"], 1, "has no clusters yet: make them with `simsearch cluster -k K`"),
    ],
)
def test_cli_errors_are_one_line(grouped, args, code, message):
    path = grouped[0].path
    grouped[0].close()
    result = CliRunner().invoke(cli, ["cluster", "--index", str(path), *args])
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    if code == 1:
        search = CliRunner().invoke(cli, ["search", "id:1", "--index", str(path), "--cluster", "1"])
        assert search.exit_code == 1 and "no clusters yet" in search.stderr


def test_a_run_killed_before_its_commit_leaves_the_last_clustering(grouped):
    index, ids, _, _ = grouped
    first = index.cluster(GROUPS)
    before = labels_of(index, ids)
    index.close()
    argv = [sys.executable, "-m", "simsearch", "-q", "cluster", "--index", str(index.path)]
    env = subprocess_env(SIMSEARCH_CRASH_AT="clusters:1")
    killed = subprocess.run([*argv, "-k", "3"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    with Index.open(index.path) as again:
        assert again.clustering() == first
        assert np.array_equal(labels_of(again, ids), before)


@pytest.mark.parametrize("fmt", ["npy", "csv", "parquet"])
def test_export_carries_each_images_cluster(grouped, tmp_path, fmt):
    import csv

    index = grouped[0]
    index.cluster(GROUPS, seed=0)
    late = fill(index, planted(5, seed=9)[0], start=10_000)  # indexed after the run
    with index.store.engine.connect() as conn:
        expected = dict(conn.exec_driver_sql("SELECT image_id, cluster FROM clusters").all())
    expected.update({int(i): None for i in late})
    out = tmp_path / f"out.{fmt}"
    assert index.export(out, fmt) == len(expected)
    if fmt == "npy":
        ids = np.load(out / "ids.npy").tolist()
        clusters = [None if c < 0 else c for c in np.load(out / "clusters.npy").tolist()]
    elif fmt == "csv":
        rows = list(csv.DictReader(out.open()))
        ids = [int(r["id"]) for r in rows]
        clusters = [int(r["cluster"]) if r["cluster"] else None for r in rows]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        ids, clusters = table["id"], table["cluster"]
    assert dict(zip(ids, clusters, strict=True)) == expected
