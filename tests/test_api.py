"""The Index API: self-search, reopening, near copies, model checks, failures, the FAISS cache."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import draw_image
from PIL import Image

from simsearch import Hit, Index
from simsearch.cli.render import add_line
from simsearch.errors import (
    IndexExistsError,
    IndexNotFoundError,
    ManifestMismatchError,
    QueryError,
)
from simsearch.storage.manifest import DATABASE_FILE, MANIFEST_FILE, VECTORS_FILE


@pytest.fixture
def index(tmp_path, tiny_vit, photo_dir):
    idx = Index.create(tmp_path / "index", model=tiny_vit)
    idx.add([photo_dir])
    yield idx
    idx.close()


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_image_finds_itself_first_with_score_one(index, photo_dir):
    for path in _files(photo_dir):
        hits = index.search(path, k=3)
        assert hits[0].path == str(path)
        assert abs(hits[0].score - 1.0) < 1e-4
        assert hits[0].score >= hits[1].score >= hits[2].score


def test_hits_are_dataclasses_with_id_path_score(index, photo_dir):
    hit = index.search(photo_dir / "img0.jpg", k=1)[0]
    assert isinstance(hit, Hit)
    assert index.search(f"id:{hit.id}", k=1)[0] == Hit(
        hit.id, hit.path, pytest.approx(1.0, abs=1e-4)
    )
    assert index.search(hit.id, k=1)[0].path == hit.path


def test_k_larger_than_the_index_returns_every_image_once(index):
    hits = index.search("id:1", k=50)
    assert len(hits) == 8
    assert len({h.id for h in hits}) == 8


def test_reopened_index_answers_the_same(tmp_path, tiny_vit, photo_dir):
    with Index.create(tmp_path / "ix", model=tiny_vit) as idx:
        idx.add(photo_dir)
        before = [idx.search(p, k=5) for p in _files(photo_dir)]
    with Index.open(tmp_path / "ix") as idx:
        after = [idx.search(p, k=5) for p in _files(photo_dir)]
        # Queries by a fresh (not stored) vector go through the model; same answers too.
        fresh = [idx.search(Image.open(p), k=5) for p in _files(photo_dir)]
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
    assert [[h.id for h in r] for r in fresh] == [[h.id for h in r] for r in before]


@pytest.mark.parametrize(
    "edit",
    ["jpeg-q60", "resize-90pct", "resize-110pct", "png-reencode"],
)
def test_near_copy_ranks_its_original_first(index, photo_dir, tmp_path, edit):
    for path in _files(photo_dir):
        img = Image.open(path).convert("RGB")
        buf = io.BytesIO()
        if edit == "jpeg-q60":
            img.save(buf, "JPEG", quality=60)
        elif edit.startswith("resize"):
            scale = 0.9 if edit == "resize-90pct" else 1.1
            img.resize((round(img.width * scale), round(img.height * scale))).save(buf, "PNG")
        else:
            img.save(buf, "PNG")
        copy = tmp_path / f"copy-{path.stem}.png"
        copy.write_bytes(buf.getvalue())
        assert index.search(copy, k=1)[0].path == str(path), f"{edit} copy of {path.name}"


def test_embed_returns_unit_rows_for_paths_and_pil_images(index, photo_dir):
    vecs = index.embed([photo_dir / "img0.jpg", draw_image(1)])
    assert vecs.shape == (2, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_opening_with_another_model_is_refused_naming_it(index, other_vit):
    with pytest.raises(ManifestMismatchError, match=r"model: index was built with .*tiny-vit"):
        Index.open(index.path, model=other_vit)


def test_opening_with_another_layer_or_pool_is_refused(index):
    with pytest.raises(ManifestMismatchError, match="layer: index has 3, requested 1"):
        Index.open(index.path, layer=1)
    with pytest.raises(ManifestMismatchError, match="pool: index has 'cls', requested 'mean'"):
        Index.open(index.path, pool="mean")
    Index.open(index.path, layer=-1, pool="cls").close()  # the same settings, spelt otherwise


def test_a_moved_model_folder_with_the_same_weights_is_accepted(index, tiny_vit, tmp_path):
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_vit, moved)
    with Index.open(index.path, model=moved) as idx:
        assert idx.search(Image.open(idx.search("id:1")[0].path), k=1)[0].id == 1


def test_failed_files_are_listed_with_reasons_and_good_files_indexed(tmp_path, tiny_vit, photo_dir):
    (photo_dir / "empty.jpg").write_bytes(b"")
    (photo_dir / "page.png").write_text("<html>not a picture</html>")
    good = (photo_dir / "img0.jpg").read_bytes()
    (photo_dir / "cut.jpg").write_bytes(good[: len(good) // 3])
    with Index.create(tmp_path / "ix", model=tiny_vit) as idx:
        summary = idx.add(photo_dir)
        assert (summary.seen, summary.indexed, summary.failed) == (11, 8, 3)
        failed = {os.path.basename(f.path): f.error for f in idx.failed()}
        assert set(failed) == {"empty.jpg", "page.png", "cut.jpg"}
        assert "empty file" in failed["empty.jpg"]
        assert "not an image" in failed["page.png"]
        assert "truncated" in failed["cut.jpg"]
        assert idx.info().indexed == 8 and idx.info().failed == 3


def test_second_add_skips_unchanged_and_reembeds_changed_files(index, photo_dir):
    summary = index.add(photo_dir)
    assert (summary.seen, summary.indexed, summary.unchanged) == (8, 0, 8)
    target = photo_dir / "img2.jpg"
    old = index.search(target, k=1)[0]
    draw_image(5).save(target)  # new content, same path
    summary = index.add(photo_dir)
    assert (summary.indexed, summary.unchanged) == (1, 7)
    new = index.search(target, k=1)[0]
    assert new.id == old.id and new.path == old.path
    assert len(index) == 8


def test_a_file_that_turns_bad_loses_its_vector(index, photo_dir):
    target = photo_dir / "img4.jpg"
    target.write_bytes(b"garbage")
    summary = index.add(photo_dir)
    assert summary.failed == 1
    assert len(index) == 7
    assert str(target) not in {h.path for h in index.search("id:1", k=10)}
    with Index.open(index.path) as again:
        assert len(again.vectors) == 7


def test_missing_faiss_file_is_rebuilt_from_the_database(index, photo_dir):
    expected = index.search(photo_dir / "img3.png", k=4)
    index.close()
    (index.path / VECTORS_FILE).unlink()
    with Index.open(index.path) as idx:
        assert idx.search(photo_dir / "img3.png", k=4) == expected
    assert (index.path / VECTORS_FILE).is_file()


def test_corrupt_or_stale_faiss_file_is_not_trusted(index, photo_dir, tmp_path):
    expected = index.search(photo_dir / "img3.png", k=4)
    index.close()
    (index.path / VECTORS_FILE).write_bytes(b"not a faiss index")
    with Index.open(index.path) as idx:
        assert idx.search(photo_dir / "img3.png", k=4) == expected
    # A FAISS file from another index (other ids) is stale too.
    from simsearch.search.vectors import VectorIndex

    stale = VectorIndex(32)
    stale.add(np.array([999]), np.ones((1, 32), dtype=np.float32) / np.sqrt(32))
    stale.save(index.path / VECTORS_FILE)
    with Index.open(index.path) as idx:
        assert idx.search(photo_dir / "img3.png", k=4) == expected


def test_index_folder_holds_manifest_database_and_vectors(index):
    assert {p.name for p in index.path.iterdir()} >= {MANIFEST_FILE, DATABASE_FILE, VECTORS_FILE}
    manifest = json.loads((index.path / MANIFEST_FILE).read_text())
    assert manifest["dim"] == 32 and manifest["pool"] == "cls" and manifest["layer"] == 3
    assert manifest["format_version"] == 1


def test_create_refuses_an_existing_index_and_open_a_missing_one(index, tiny_vit, tmp_path):
    with pytest.raises(IndexExistsError):
        Index.create(index.path, model=tiny_vit)
    with pytest.raises(IndexNotFoundError, match="no index at"):
        Index.open(tmp_path / "nothing-here")


def test_bad_queries_are_clear_errors(index, tmp_path):
    with pytest.raises(QueryError, match="no indexed image has id 999"):
        index.search("id:999")
    with pytest.raises(QueryError, match="expected id:N"):
        index.search("id:abc")
    with pytest.raises(QueryError, match="no such image file"):
        index.search(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(QueryError, match="not an image"):
        index.search(bad)


def test_a_loaded_embedder_can_be_shared_and_is_checked(index, tiny_vit, other_vit, tmp_path):
    from simsearch.models.embed import Embedder

    embedder = Embedder(tiny_vit)
    with Index.open(index.path, embedder=embedder) as idx:
        assert idx.embedder is embedder
    with Index.create(tmp_path / "second", embedder=embedder) as second:
        assert second.manifest == index.manifest
    with pytest.raises(ManifestMismatchError, match="model: index was built with"):
        Index.open(index.path, embedder=Embedder(other_vit))


def test_mixed_queries_in_one_call_answer_like_single_ones(index, photo_dir):
    stored = index.search("id:2", k=1)[0]
    vector = index.embed([stored.path])[0] * 3.0  # not unit length: normalised by search
    queries = [photo_dir / "img1.png", draw_image(6), "id:2", vector, Image.open(stored.path)]
    together = index.search_many(queries, k=3)
    alone = [index.search(q, k=3) for q in queries]
    assert [[h.id for h in hits] for hits in together] == [[h.id for h in hits] for hits in alone]
    for a, b in zip(together, alone, strict=True):  # batched matmuls round differently
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    assert together[3][0].id == stored.id and together[3][0].score == pytest.approx(1, abs=1e-4)
    with pytest.raises(QueryError, match="finite and non-zero"):
        index.search(np.zeros(32, dtype=np.float32))


def test_a_fifo_given_as_query_is_refused_not_waited_on(index, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(QueryError, match="not a regular file"):
        index.search(tmp_path / "pipe.jpg")


def test_a_folder_given_as_query_is_called_a_folder(index, tmp_path):
    """It was 'not a regular file (a FIFO, socket or device)'."""
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(QueryError, match="is a folder, not an image file"):
        index.search(tmp_path / "a-folder")


def test_the_readme_snippet_runs_as_written_twice(tmp_path, tiny_vit, monkeypatch):
    """`Index.add("~/Pictures")` looked for a folder named "~" (0 files), and the snippet's
    Index.create raised IndexExistsError when run a second time."""
    from conftest import draw_image

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "Pictures").mkdir(parents=True)
    for i in range(3):
        draw_image(i).save(tmp_path / "home" / "Pictures" / f"p{i}.png")
    monkeypatch.chdir(tmp_path)
    for run in range(2):
        with Index.open_or_create("indexes/photos", model=tiny_vit) as index:
            summary = index.add(["~/Pictures"])
            assert (summary.seen, summary.indexed) == (3, 3 if run == 0 else 0)
            assert add_line(summary).startswith("3 files seen")
