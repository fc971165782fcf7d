"""Index types: every type finds the true neighbours, forgets what was removed, survives a
reopen, and auto/IVF indexes change as the collection grows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIM, clustered, fill

from simsearch import Index
from simsearch.cli import cli as main
from simsearch.errors import IndexTypeError
from simsearch.search.plan import plan_index
from simsearch.search.vectors import VectorIndex


def recall_at_10(index: Index, data: np.ndarray, ids: np.ndarray, queries, **params) -> float:
    truth = ids[np.argsort(-(queries @ data.T), axis=1)[:, :10]]
    found = index.search_many(list(queries), k=10, **params)
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len({h.id for h in hits} & set(t)) / 10 for hits, t in pairs]))


@pytest.fixture
def empty_index(tmp_path, tiny_vit):
    with Index.create(tmp_path / "idx", tiny_vit) as index:
        yield index


@pytest.mark.slow
@pytest.mark.parametrize(
    ("index_type", "kind", "bound"),
    [
        ("flat", "flat", 1.0),
        ("hnsw", "hnsw", 0.95),
        ("ivf", "ivf", 0.9),
        ("ivfpq", "ivfpq", 0.9),
        ("IVF32,SQ8", "factory", 0.9),
    ],
)
def test_every_type_finds_the_true_neighbours(empty_index, index_type, kind, bound):
    data = clustered(12_000)
    ids = fill(empty_index, data)
    empty_index.set_index_type(index_type)
    info = empty_index.info()
    assert (info.index_type, info.index_built) == (index_type, kind)
    queries = clustered(50, seed=1)
    assert recall_at_10(empty_index, data, ids, queries) >= bound
    # Scores are exact cosines, whatever the index stores.
    hit = empty_index.search(queries[0], k=1)[0]
    assert hit.score == pytest.approx(float(data[ids == hit.id][0] @ queries[0]), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("share", [0.01, 0.5])
def test_a_search_within_a_subset_finds_its_true_neighbours(
    empty_index, monkeypatch, index_type, share
):
    data = clustered(12_000)
    ids = fill(empty_index, data)
    empty_index.set_index_type(index_type)
    subset = np.random.default_rng(3).choice(ids, int(len(ids) * share), replace=False)
    queries = clustered(20, seed=1)
    inside = np.isin(ids, subset)
    # Small subsets are ranked on their stored vectors; force the FAISS filter too.
    for exact_max in (20_000, 0):
        monkeypatch.setattr("simsearch.config.FILTER_EXACT_MAX", exact_max)
        recall = recall_at_10(
            empty_index, data[inside], ids[inside], queries, within=subset.tolist()
        )
        assert recall >= 0.9, (exact_max, recall)
        hits = empty_index.search_many(list(queries), k=10, within=subset.tolist())
        assert all(len(h) == 10 and {x.id for x in h} <= set(subset.tolist()) for h in hits)


@pytest.mark.slow
def test_reranking_recovers_what_compression_loses(empty_index):
    data = clustered(12_000)
    ids = fill(empty_index, data)
    empty_index.set_index_type("ivfpq")
    queries = clustered(50, seed=1)
    plain = recall_at_10(empty_index, data, ids, queries, rerank=0)
    reranked = recall_at_10(empty_index, data, ids, queries, rerank=10)
    assert reranked >= 0.9
    assert reranked > plain + 0.1


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "ivfpq"])
def test_removed_and_replaced_vectors_are_never_returned(tmp_path, index_type):
    data = clustered(10_000)
    ids = np.arange(10, 10 + len(data), dtype=np.int64)
    plan = plan_index(index_type, len(data), DIM)
    vectors = VectorIndex(DIM, factory=plan.factory)
    if not vectors.is_trained:
        vectors.train(data)
    vectors.add(ids, data)
    removed = ids[:100]
    assert vectors.remove(removed) == 100
    # Replace 100 vectors by the negation of another's: only the new vector may match.
    vectors.add(ids[100:200], -data[200:300])
    assert len(vectors) == len(data) - 100
    assert vectors.tombstones == (0 if index_type == "flat" else 200)
    for probe in (vectors, _reloaded(vectors, tmp_path, ids[100:])):
        _, found = probe.search(data[:300], k=5, nprobe=64, ef=128)
        assert not set(found.ravel().tolist()) & set(removed.tolist())
        _, found = probe.search(-data[200:300], k=1, nprobe=64, ef=128)
        hit_rate = np.mean(found[:, 0] == ids[100:200])
        assert hit_rate >= (1.0 if index_type in ("flat", "hnsw", "ivf") else 0.8)


def _reloaded(vectors: VectorIndex, tmp_path, live_ids: np.ndarray) -> VectorIndex:
    """Save and load as an index folder does: tombstones come back from the live ids."""
    vectors.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", DIM, factory=vectors.factory, mmap=True)
    loaded.bury_superseded(np.sort(live_ids))
    assert loaded.tombstones == vectors.tombstones
    return loaded


def test_deleted_files_vanish_from_an_hnsw_index_and_stay_gone(tmp_path, tiny_vit, photo_dir):
    index_dir = tmp_path / "idx"
    with Index.create(index_dir, tiny_vit, index_type="hnsw") as index:
        index.add(photo_dir)
        assert index.info().index_built == "hnsw"
        victim = sorted(photo_dir.iterdir())[0]
        victim_id = index.search(victim, k=1)[0].id
        victim.unlink()
        assert index.add(photo_dir).removed == 1
        assert index.info().tombstones == 1
        assert victim_id not in {h.id for h in index.search("id:2", k=100)}
    with Index.open(index_dir) as index:  # from the saved file this time
        assert index.info().tombstones == 1
        assert victim_id not in {h.id for h in index.search("id:2", k=100)}
        assert index.verify() == []


@pytest.mark.slow
def test_auto_says_what_it_chose_and_moves_on_as_the_collection_grows(empty_index, monkeypatch):
    monkeypatch.setattr("simsearch.config.AUTO_FLAT_MAX_VECTORS", 1_000)
    monkeypatch.setattr("simsearch.config.AUTO_HNSW_MAX_BYTES", 5_000 * DIM * 4)
    assert empty_index.info().index_built == "flat"
    fill(empty_index, clustered(800))
    assert empty_index.set_index_type("auto") is None  # already right: nothing rebuilt
    fill(empty_index, clustered(2_000, seed=2), start=800)
    assert "flat -> hnsw" in empty_index.set_index_type("auto")
    info = empty_index.info()
    assert info.index_built == "hnsw" and "2,800 vectors" in info.index_reason
    fill(empty_index, clustered(10_000, seed=3), start=2_800)
    assert "hnsw -> ivfpq" in empty_index.set_index_type("auto")
    assert empty_index.info().index_built == "ivfpq"


def test_ivf_is_retrained_when_the_collection_outgrows_its_training(tmp_path, empty_index):
    fill(empty_index, clustered(1_000))
    empty_index.set_index_type("ivf")
    cache = empty_index.parts.cache
    assert cache.built["trained_on"] == 1_000 and cache.due() is None
    fill(empty_index, clustered(4_500, seed=2), start=1_000)
    assert "5.5x the 1,000 it was trained on" in cache.due()
    cache.maintain()
    assert cache.built["trained_on"] == 5_500 and cache.due() is None


def test_tombstones_are_swept_when_they_pile_up(empty_index):
    ids = fill(empty_index, clustered(3_000))
    empty_index.set_index_type("hnsw")
    empty_index.store.remove_images(ids[:1_000].tolist())
    cache = empty_index.parts.cache
    cache.remove(ids[:1_000])
    assert "tombstones" in cache.due()
    cache.maintain()
    cache.save()
    assert empty_index.verify() == []
    assert empty_index.vectors.tombstones == 0 and len(empty_index.vectors) == 2_000


def test_big_files_are_memory_mapped_for_readers_and_reloaded_for_writers(
    tmp_path, tiny_vit, photo_dir, monkeypatch
):
    monkeypatch.setattr("simsearch.config.MMAP_MIN_BYTES", 0)
    index_dir = tmp_path / "idx"
    with Index.create(index_dir, tiny_vit, index_type="hnsw") as index:
        index.add(photo_dir)
        expected = index.search("id:1", k=5)
    with Index.open(index_dir) as index:
        assert index.search("id:1", k=5) == expected
        assert index.vectors.mmapped
        (photo_dir / "copy.png").write_bytes(sorted(photo_dir.iterdir())[0].read_bytes())
        assert index.add(photo_dir).indexed == 1
        assert not index.vectors.mmapped
        assert len(index.search("id:1", k=50)) == len(index)


def test_a_bad_index_type_is_a_clear_error_and_changes_nothing(empty_index):
    with pytest.raises(IndexTypeError, match="neither an index type"):
        empty_index.set_index_type("IVF12,Bogus")
    with pytest.raises(IndexTypeError, match="not an index type"):
        empty_index.set_index_type("hnsw; rm -rf /")
    assert empty_index.manifest.index_type == "auto"


def test_cli_sets_the_type_and_search_takes_its_parameters(tmp_path, tiny_vit, photo_dir):
    runner = CliRunner()
    index_dir = str(tmp_path / "idx")
    base = ["--index", index_dir]
    result = runner.invoke(
        main, ["index", str(photo_dir), *base, "--model", str(tiny_vit), "--index-type", "ivf"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(main, ["info", *base, "--json"]).output)
    assert info["index_type"] == "ivf" and info["index_built"] == "flat"  # too few to train
    assert "flat until" in info["index_reason"]
    result = runner.invoke(main, ["index", *base, "--index-type", "hnsw"])
    assert result.exit_code == 0, result.output
    assert "hnsw" in result.output
    result = runner.invoke(main, ["search", "id:1", *base, "--ef", "100", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["hits"]) == 3
    result = runner.invoke(main, ["index", *base, "--index-type", "IVF8,Nonsense"])
    assert result.exit_code != 0 and "neither an index type" in result.output
    result = runner.invoke(main, ["search", "id:1", *base, "--nprobe", "0"])
    assert result.exit_code != 0


def test_a_factory_string_too_big_to_train_yet_searches_exactly_meanwhile(empty_index):
    data = clustered(500)
    ids = fill(empty_index, data)
    assert empty_index.set_index_type("IVF4096,Flat") is not None
    info = empty_index.info()
    assert info.index_built == "flat" and "flat for now" in info.index_reason
    assert empty_index.search(data[7], k=1)[0].id == ids[7]
    fill(empty_index, clustered(100, seed=5), start=500)  # not yet twice as many: no retry
    assert empty_index.parts.cache.due() is None


@pytest.mark.parametrize(
    ("index_type", "says"),
    [
        ("HNSW0", "FAISS aborted (SIGABRT)"),  # a C++ assertion: it killed the process
        ("IDMap,Flat", "without IDMap"),  # saved, then every rebuild raised
        ("IDMap2,HNSW32", "without IDMap"),
    ],
)
def test_an_index_type_that_fails_is_refused_before_anything_is_saved(
    tmp_path, tiny_vit, photo_dir, index_type, says
):
    """HNSW0 aborted the process (exit 134) and was kept as the index's type, so that
    `index`, `search` and `repair` aborted too. Now it is tried on random vectors in a
    child process first: one line, and the index is as it was."""
    runner = CliRunner()
    new = runner.invoke(
        main,
        ["index", str(photo_dir), "--index", str(tmp_path / "new"), "--model", str(tiny_vit),
         "--index-type", index_type],
    )  # fmt: skip
    assert new.exit_code == 1 and says in new.stderr.strip().splitlines()[-1], new.output
    assert not (tmp_path / "new" / "meta.sqlite").exists()

    existing = ["--index", str(tmp_path / "idx")]
    made = runner.invoke(main, ["index", str(photo_dir), *existing, "--model", str(tiny_vit)])
    assert made.exit_code == 0, made.output
    changed = runner.invoke(main, ["index", str(photo_dir), *existing, "--index-type", index_type])
    assert changed.exit_code == 1 and says in changed.stderr, changed.output
    for after in (["search", "id:1", "-k", "2"], ["verify"], ["index", str(photo_dir)]):
        result = runner.invoke(main, [*after, *existing])
        assert result.exit_code == 0, (after, result.output)
    with Index.open(tmp_path / "idx") as index:
        assert index.info().index_type == "auto"


def test_a_factory_with_too_many_lists_to_try_is_kept_for_the_collection(empty_index):
    """IVF65536 cannot be trained on a trial's 2,048 vectors, but is right for tens of
    millions: it is kept, and the index stays exact until it can be trained."""
    empty_index.set_index_type("IVF65536,Flat")
    assert empty_index.info().index_type == "IVF65536,Flat"


def test_removing_from_a_flat_index_keeps_its_tombstones():
    """On a Flat index, remove() after bury_superseded() forgot the tombstones: len() and
    ids() disagreed, and search returned the buried id again."""
    data = clustered(4, DIM, seed=5)
    vectors = VectorIndex(DIM)
    vectors.add(np.array([1, 2, 3, 4]), data)
    assert vectors.bury_superseded(np.array([2, 3, 4])) == 1  # 1 is gone from the database
    assert vectors.remove(np.array([3])) == 1
    assert len(vectors) == 2 and vectors.ids().tolist() == [2, 4]
    _, ids = vectors.search(data, 4)
    assert set(ids[ids >= 0].tolist()) == {2, 4}
    assert vectors.remove(np.array([1])) == 0  # a tombstone's id: nothing live removed
    assert len(vectors) == 2 and vectors.entries == 2
