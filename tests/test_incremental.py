"""Incremental runs: only what changed is embedded; renames, copies and deletions are handled."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import draw_image

from simsearch import Index
from simsearch.models.embed import Embedder


class CountingEmbedder(Embedder):
    """The real embedder, counting the images that go through the model."""

    calls = 0

    def embed_pixels(self, pixels):
        self.calls += len(pixels)
        return super().embed_pixels(pixels)


@pytest.fixture
def counted(tmp_path, tiny_vit, photo_dir):
    embedder = CountingEmbedder(tiny_vit, batch_size=4)
    index = Index.create(tmp_path / "index", embedder=embedder)
    first = index.add(photo_dir)
    assert (first.seen, first.indexed, embedder.calls) == (8, 8, 8)
    embedder.calls = 0
    yield index, embedder
    index.close()


def _summary(s):
    return dict(
        indexed=s.indexed,
        unchanged=s.unchanged,
        failed=s.failed,
        moved=s.moved,
        removed=s.removed,
        reused=s.reused,
    )


def _ids_by_path(index):
    return {path: known.id for path, known in index.store.known_files().items()}


def test_unchanged_files_are_not_read_or_embedded(counted, photo_dir, monkeypatch):
    index, embedder = counted
    import simsearch.ops.prepare

    def no_reads(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(simsearch.ops.prepare, "read_image_file", no_reads)
    summary = index.add(photo_dir)
    assert _summary(summary) == dict(indexed=0, unchanged=8, failed=0, moved=0, removed=0, reused=0)
    assert embedder.calls == 0


def test_edit_rename_delete_add_in_one_run(counted, photo_dir):
    index, embedder = counted
    ids = _ids_by_path(index)
    edited = photo_dir / "img0.jpg"
    draw_image(40).save(edited)  # new content, same path
    os.rename(photo_dir / "img1.png", photo_dir / "sub" / "renamed.png")  # moved and renamed
    os.unlink(photo_dir / "img2.jpg")  # gone
    draw_image(41).save(photo_dir / "new.png")  # new
    summary = index.add(photo_dir)
    assert _summary(summary) == dict(indexed=2, unchanged=5, failed=0, moved=1, removed=1, reused=0)
    assert embedder.calls == 2  # the edited file and the new one; not the renamed one
    after = _ids_by_path(index)
    assert after[str(photo_dir / "sub" / "renamed.png")] == ids[str(photo_dir / "img1.png")]
    assert after[str(edited)] == ids[str(edited)]
    assert str(photo_dir / "img2.jpg") not in after
    assert len(index) == 8
    assert index.search(photo_dir / "sub" / "renamed.png", k=1)[0].score == pytest.approx(1)
    assert index.verify() == []


def test_identical_files_share_one_embedding(counted, photo_dir, tmp_path):
    index, embedder = counted
    # A copy of an indexed file: its vector is reused.
    shutil.copy(photo_dir / "img3.png", photo_dir / "copy-of-3.png")
    # Three byte-identical new files: embedded once.
    draw_image(42).save(tmp_path / "triplet.png")
    for name in ("t1.png", "t2.png", "t3.png"):
        shutil.copy(tmp_path / "triplet.png", photo_dir / name)
    summary = index.add(photo_dir)
    assert (summary.indexed, summary.reused, summary.moved) == (4, 1, 0)
    assert embedder.calls == 1
    v = [index.store.vector(_ids_by_path(index)[str(photo_dir / n)]) for n in ("t1.png", "t3.png")]
    np.testing.assert_array_equal(v[0], v[1])
    original = index.search(photo_dir / "img3.png", k=2)
    assert {h.path for h in original} == {
        str(photo_dir / "img3.png"),
        str(photo_dir / "copy-of-3.png"),
    }


def test_content_of_a_file_changed_in_the_same_run_is_not_reused_stale(counted, photo_dir):
    """b.png gets a's old content while a.png gets new content: b must get a's old vector."""
    index, embedder = counted
    shutil.copy(photo_dir / "img4.jpg", photo_dir / "zz-late.jpg")  # listed after img4.jpg
    for i in range(4):  # new files in between, so img4.jpg is committed in an earlier batch
        draw_image(50 + i).save(photo_dir / f"m{i}.png")
    old = index.store.vector(_ids_by_path(index)[str(photo_dir / "img4.jpg")])
    draw_image(43).save(photo_dir / "img4.jpg")
    index.add(photo_dir)
    assert embedder.calls == 6  # img4, m0-m3, and zz-late.jpg once its source had changed
    late = index.store.vector(_ids_by_path(index)[str(photo_dir / "zz-late.jpg")])
    assert float(late @ old) > 0.9999
    assert index.verify() == []


def test_no_prune_keeps_deleted_files(counted, photo_dir):
    index, _ = counted
    os.unlink(photo_dir / "img5.png")
    summary = index.add(photo_dir, prune=False)
    assert summary.removed == 0 and len(index) == 8
    assert index.add(photo_dir).removed == 1
    assert len(index) == 7


def test_only_the_folders_being_indexed_are_pruned(counted, photo_dir, tmp_path):
    index, _ = counted
    other = tmp_path / "other"
    other.mkdir()
    draw_image(44).save(other / "x.png")
    index.add(other)
    assert len(index) == 9
    summary = index.add(photo_dir / "sub")  # img7 only; the rest of photo_dir is not pruned
    assert summary.removed == 0 and len(index) == 9


def test_an_empty_root_folder_is_not_pruned(counted, photo_dir, tmp_path, caplog):
    """An unmounted disk looks like an empty folder; its files stay in the index."""
    index, _ = counted
    hidden = tmp_path / "elsewhere"
    photo_dir.rename(hidden)
    photo_dir.mkdir()
    summary = index.add(photo_dir)
    assert summary.removed == 0 and len(index) == 8
    assert "not removing 8 indexed files" in caplog.text


def test_a_file_that_comes_back_is_indexed_again(counted, photo_dir, tmp_path):
    index, embedder = counted
    shutil.move(photo_dir / "img6.jpg", tmp_path / "img6.jpg")
    assert index.add(photo_dir).removed == 1
    shutil.move(tmp_path / "img6.jpg", photo_dir / "img6.jpg")
    summary = index.add(photo_dir)
    assert (summary.indexed, summary.removed) == (1, 0)
    assert embedder.calls == 1


def test_long_runs_save_the_faiss_file_as_they_go(tmp_path, tiny_vit, photo_dir, monkeypatch):
    """So that a search started mid-run loads a recent file instead of rebuilding."""
    monkeypatch.setattr("simsearch.config.FAISS_CHECKPOINT_SECONDS", 0.0)
    saved = []
    with Index.create(tmp_path / "ix", model=tiny_vit, batch_size=4) as index:
        original = index.parts.cache.save

        def save():
            original()
            saved.append(index.store.generations())

        monkeypatch.setattr(index.parts.cache, "save", save)
        index.add(photo_dir)
    assert len(saved) == 3  # after each of the two batches, and at the end
    assert all(generation == faiss for generation, faiss in saved)
    assert saved[0][0] < saved[1][0]


def test_interrupt_between_commit_and_faiss_update_leaves_no_stale_vectors(
    tmp_path, tiny_vit, photo_dir, monkeypatch
):
    import simsearch.ops.writer

    with Index.create(tmp_path / "ix", model=tiny_vit, batch_size=4) as index:
        index.add(photo_dir)
    for i, path in enumerate(sorted(photo_dir.glob("img*.*"))):
        draw_image(60 + i).save(path)  # every file changes: same ids, new vectors

    def interrupt(name):
        if name == "after-commit":
            raise KeyboardInterrupt

    monkeypatch.setattr(simsearch.ops.writer, "crash_point", interrupt)
    with Index.open(tmp_path / "ix") as index, pytest.raises(KeyboardInterrupt):
        index.add(photo_dir)
    monkeypatch.undo()
    with Index.open(tmp_path / "ix") as index:
        changed = str(sorted(photo_dir.glob("img*.*"))[0])
        hit = index.search(changed, k=1)[0]
        assert hit.path == changed and hit.score == pytest.approx(1, abs=1e-4)
        assert index.verify() == []


def test_a_run_with_nothing_new_does_not_load_the_model(index_path, photo_dir, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("simsearch.models.embed.Embedder.__init__", no_model)
    with Index.open(index_path) as index:
        summary = index.add(photo_dir)
        assert summary.unchanged == 8
        os.rename(photo_dir / "img1.png", photo_dir / "moved.png")  # a move needs no model
        assert index.add(photo_dir).moved == 1
    monkeypatch.undo()
    draw_image(77).save(photo_dir / "new.png")
    with Index.open(index_path) as index:
        assert index.add(photo_dir).indexed == 1  # and a new file loads it on demand
