"""Near-duplicate groups: planted copies are found and nothing else, identical files always
group, the keep policy holds, and the CLI prints what scripts expect."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import clustered, fill

from simsearch import Index
from simsearch.cli import cli
from simsearch.errors import QueryError
from simsearch.ops.dedup import UnionFind
from simsearch.storage.store import GoodImage


def _copy_of(vector: np.ndarray, rng, similarity: float) -> np.ndarray:
    """A unit vector at cosine `similarity` from `vector` (an edited copy's embedding)."""
    noise = rng.standard_normal(vector.shape)
    noise -= (noise @ vector) * vector
    noise /= np.linalg.norm(noise)
    return (similarity * vector + np.sqrt(1 - similarity**2) * noise).astype(np.float32)


@pytest.fixture(scope="module")
def planted_template(tmp_path_factory, tiny_vit):
    """The index `planted` copies, built once: writing its 2,078 rows took 0.4 s a test."""
    rng = np.random.default_rng(3)
    data = clustered(2_000, seed=4, clusters=400)
    copies, sources = [], []
    for source in rng.choice(len(data), 30, replace=False):
        for _ in range(rng.integers(1, 4)):
            copies.append(_copy_of(data[source], rng, rng.uniform(0.985, 0.998)))
            sources.append(int(source))
    path = tmp_path_factory.mktemp("planted") / "idx"
    with Index.create(path, tiny_vit) as index:
        ids = fill(index, np.concatenate([data, np.stack(copies)]))
    return path, ids, data, sources


@pytest.fixture
def planted(tmp_path, planted_template):
    """2,000 distinct images and 30 of them with 1-3 near copies each (cosine 0.985-0.998);
    a fresh copy of the index for each test."""
    template, ids, data, sources = planted_template
    shutil.copytree(template, tmp_path / "idx")
    with Index.open(tmp_path / "idx") as index:
        yield index, ids.copy(), data.copy(), list(sources)


def test_planted_copies_are_found_and_nothing_else(planted):
    index, ids, data, sources = planted
    # The threshold sits between the copies (>= 0.985) and distinct images' nearest.
    nearest = np.sort(data @ data.T, axis=1)[:, -2]
    assert nearest.max() < 0.98
    groups = index.duplicates(0.98)
    found = {frozenset([g.keep_id, *(d.id for d in g.duplicates)]) for g in groups}
    expected: dict[int, set[int]] = {}
    for n, source in enumerate(sources):
        expected.setdefault(int(ids[source]), {int(ids[source])}).add(int(ids[len(data) + n]))
    assert found == {frozenset(members) for members in expected.values()}
    for group in groups:
        assert all(0.98 <= d.score <= 1.0 for d in group.duplicates)


def test_byte_identical_files_always_group_and_the_keep_policy_holds(tmp_path, tiny_vit):
    rng = np.random.default_rng(0)
    a, b = clustered(2, seed=9)
    b = -a  # as far apart as vectors get: only the content hash can join them
    images = [
        GoodImage("/p/small.jpg", 100, 5, "a" * 64, 640, 480),
        GoodImage("/p/big-but-newer.jpg", 100, 9, "a" * 64, 4000, 3000),
        GoodImage("/p/big-older-longer-name.jpg", 100, 1, "a" * 64, 4000, 3000),
        GoodImage("/p/big-older.jpg", 100, 1, "a" * 64, 4000, 3000),
    ]
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        fill(index, np.stack([a, b, a, b]), images=images)
        fill(index, clustered(50, seed=rng.integers(99)), start=10)
        (group,) = index.duplicates(0.999)
    assert group.keep_path == "/p/big-older.jpg"  # resolution, size, then age, then path
    assert [d.path for d in group.duplicates][-1] in {"/p/big-but-newer.jpg", "/p/small.jpg"}
    assert {d.path for d in group.duplicates} == {
        "/p/small.jpg",
        "/p/big-but-newer.jpg",
        "/p/big-older-longer-name.jpg",
    }


def test_groups_larger_than_the_neighbour_list_are_found_whole(tmp_path, tiny_vit):
    rng = np.random.default_rng(1)
    base = clustered(1, seed=5)[0]
    copies = [base] + [_copy_of(base, rng, 0.997) for _ in range(11)]  # 12 of one image
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        fill(index, np.stack(copies))
        groups = index.duplicates(0.99, neighbours=2)
    assert len(groups) == 1 and len(groups[0].duplicates) == 11


def test_a_chain_of_near_pairs_does_not_make_far_images_duplicates(tmp_path, tiny_vit):
    rng = np.random.default_rng(1)
    chain = [clustered(1, seed=5)[0]]
    for _ in range(11):  # each close to the previous, drifting away from the first
        chain.append(_copy_of(chain[-1], rng, 0.995))
    chain = np.stack(chain)
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        ids = fill(index, chain)
        groups = index.duplicates(0.99, neighbours=2)
    vector = dict(zip(ids.tolist(), chain, strict=True))
    # Every image is in one group, and within the threshold of that group's kept image.
    members = [g.keep_id for g in groups] + [d.id for g in groups for d in g.duplicates]
    assert sorted(members) == sorted(ids.tolist())
    assert len(groups) > 1
    for g in groups:
        for d in g.duplicates:
            assert float(vector[g.keep_id] @ vector[d.id]) >= 0.99 - 1e-6
            assert d.score == pytest.approx(float(vector[g.keep_id] @ vector[d.id]), abs=1e-5)


def test_bad_settings_are_clear_errors(planted):
    index = planted[0]
    with pytest.raises(QueryError, match="between -1 and 1"):
        index.duplicates(1.5)


def test_union_find_never_builds_pairs():
    sets = UnionFind()
    for a, b in [(1, 2), (3, 4), (2, 3), (10, 11)]:
        sets.union(a, b)
    assert sorted(sets.groups()) == [[1, 2, 3, 4], [10, 11]]


def test_cli_dedup_json_and_csv(planted):
    index = planted[0]
    args = ["dedup", "--index", str(index.path), "--threshold", "0.98"]
    runner = CliRunner()
    lines = runner.invoke(cli, [*args, "--json"]).output.strip().splitlines()
    assert len(lines) == 30
    first = json.loads(lines[0])
    facts = {"width", "height", "format", "lossless", "size", "mtime_ns"}
    assert set(first) == {"keep", "duplicates", *facts}
    assert set(first["duplicates"][0]) == {"path", "score", "why", *facts}
    rows = runner.invoke(cli, [*args, "--csv"]).output.strip().splitlines()
    assert rows[0] == "group,role,path,score,width,height,format,lossless,size,mtime_ns,why"
    assert sum(1 for r in rows if ",keep," in r) == 30
    human = runner.invoke(cli, args).output
    assert human.strip().endswith("(threshold 0.98)") and "30 groups" in human


def test_compressed_indexes_find_the_same_groups(planted):
    index = planted[0]
    exact = index.duplicates(0.98)
    index.set_index_type("ivfpq")
    assert index.info().index_built == "ivfpq"
    assert index.duplicates(0.98) == exact


@pytest.mark.slow
def test_dedup_of_200k_vectors_runs_in_bounded_memory():
    """200k vectors: an n x n similarity matrix would take 160 GB; dedup's own allocations
    (everything but the FAISS index, which is not its to count) stay under 100 MB."""
    import tracemalloc

    import faiss

    from simsearch.ops.dedup import Member, find_groups
    from simsearch.records import FileFacts

    n, dim, chunk = 200_000, 32, 10_000
    rng = np.random.default_rng(7)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    data[1::1000] = data[::1000] + 0.01 * rng.standard_normal((200, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index = faiss.index_factory(dim, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(data[:20_000])
    index.add(data)
    index.nprobe = 4

    def chunks():
        for start in range(0, n, chunk):
            yield np.arange(start, start + chunk), data[start : start + chunk]

    tracemalloc.start()
    try:
        groups = find_groups(
            chunks(),
            lambda vecs, k: index.search(vecs, k),
            [],
            lambda ids: {
                i: Member(f"/p/{i}.jpg", FileFacts(1, 1, "PNG", True, 1, i), None) for i in ids
            },
            lambda ids: {i: data[i] for i in ids},
            threshold=0.99,
            neighbours=20,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {(g.keep_id, g.duplicates[0].id) for g in groups} == {
        (i, i + 1) for i in range(0, n, 1000)
    }
    assert peak < 100 * 2**20, f"dedup allocated {peak / 2**20:.0f} MB"
