"""Images in object storage: `index s3://bucket/prefix` against a local S3 server (moto),
never a real cloud. Objects are indexed as files are (same vectors for the same bytes,
hostile objects recorded, changes found by size and LastModified), searched by URL, and
never moved or deleted by dedup."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import draw_image, png_claiming

from simsearch import Index
from simsearch.errors import InputPathError
from simsearch.media.objects import is_url, read_object

pafs = pytest.importorskip("pyarrow.fs", reason="object storage needs pyarrow")

N = 10


def _png(i: int) -> bytes:
    out = io.BytesIO()
    draw_image(300 + i).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def objects():
    photos = {f"set/p{i:02d}.png": _png(i) for i in range(N)}
    photos["set/sub/copy-of-p00.png"] = photos["set/p00.png"]
    photos["set/bomb.png"] = png_claiming(50_000, 50_000)
    photos["set/notes.txt"] = b"not an image, not listed"
    photos["elsewhere/p99.png"] = _png(99)
    return photos


def test_urls_are_told_from_paths():
    assert is_url("s3://bucket/key.jpg") and is_url("gs://b/k")
    assert not is_url("/photos/a.jpg") and not is_url("C:/photos") and not is_url("s3:x")


def test_objects_index_and_search_as_files_do(s3_server, objects, tmp_path, tiny_vit):
    bucket = s3_server(objects)
    local = tmp_path / "local"
    for key, data in objects.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)

    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        summary = idx.add(f"{bucket}/set")
        failed = {f.path: f.error for f in idx.failed()}
        hits = idx.search(f"{bucket}/set/p03.png", k=2)
        assert idx.parts.models.loaded is not None  # the run loaded the model: drop it
        idx.parts.models.loaded = None
        # An indexed object, unchanged, is searched by its stored vector: no model.
        assert idx.search(f"{bucket}/set/p04.png", k=1)[0].path == f"{bucket}/set/p04.png"
        assert idx.parts.models.loaded is None
        stored = idx.store.known_files()
        vectors = idx.store.vectors_by_id([k.id for k in stored.values() if k.status == "ok"])
    assert (summary.seen, summary.indexed, summary.failed) == (N + 2, N + 1, 1)
    assert list(failed) == [f"{bucket}/set/bomb.png"]
    assert "decompression bomb" in failed[f"{bucket}/set/bomb.png"]
    assert hits[0].path == f"{bucket}/set/p03.png" and hits[0].score == pytest.approx(1, abs=1e-5)
    assert all(is_url(p) for p in stored)

    with Index.create(tmp_path / "files", model=tiny_vit) as idx:
        idx.add(local / "set")
        by_name = {p.removeprefix(str(local)): k.id for p, k in idx.store.known_files().items()}
        file_vectors = idx.store.vectors_by_id(list(by_name.values()))
    for url, known in stored.items():
        if known.status == "ok":
            name = url.removeprefix(bucket)
            np.testing.assert_allclose(vectors[known.id], file_vectors[by_name[name]], atol=1e-6)


def test_changed_and_deleted_objects_are_found(s3_server, objects, tmp_path, tiny_vit):
    bucket = s3_server(objects)
    s3 = s3_server.s3
    name = bucket.removeprefix("s3://")
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(f"{bucket}/set")
        again = idx.add(f"{bucket}/set")
        # Unchanged objects are not read; the failed one is tried again, as a file is.
        assert (again.indexed, again.failed, again.unchanged) == (0, 1, N + 1)

        with s3.open_output_stream(f"{name}/set/p01.png") as out:  # overwritten
            out.write(_png(50))
        s3.delete_file(f"{name}/set/p02.png")
        changed = idx.add(f"{bucket}/set")
        assert (changed.indexed, changed.removed) == (1, 1)
        hit = idx.search(f"{bucket}/set/p01.png", k=1)[0]
        assert hit.path == f"{bucket}/set/p01.png" and hit.score == pytest.approx(1, abs=1e-5)

        # A prefix that lists nothing where the index holds objects (a wrong endpoint, a
        # bucket being restored) removes nothing.
        for entry in s3.get_file_info(pafs.FileSelector(f"{name}/set", recursive=True)):
            if entry.type == pafs.FileType.File:
                s3.delete_file(entry.path)
        kept = len(idx)
        empty = idx.add(f"{bucket}/set")
        assert (empty.removed, len(idx)) == (0, kept)


def test_dedup_never_moves_or_deletes_objects(s3_server, objects, tmp_path, tiny_vit):
    bucket = s3_server(objects)
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add(f"{bucket}/set")
        groups = idx.duplicates(threshold=0.99)
        assert groups and any(
            f"{bucket}/set/sub/copy-of-p00.png" in (g.keep_path, *(d.path for d in g.duplicates))
            for g in groups
        )
        moved = idx.move_duplicates(groups, tmp_path / "moved")
        deleted = idx.delete_duplicates(groups)
        assert moved.files == deleted.files == 0
        assert all("object storage" in why for _, why in moved.skipped + deleted.skipped)
        assert len(idx) == N + 1
    assert read_object(f"{bucket}/set/sub/copy-of-p00.png") == objects["set/p00.png"]
    assert read_object(f"{bucket}/set/p00.png") == objects["set/p00.png"]


def test_a_bucket_that_cannot_be_listed_is_one_clear_error(s3_server, tmp_path, tiny_vit):
    with (
        Index.create(tmp_path / "index", model=tiny_vit) as idx,
        pytest.raises(InputPathError, match="cannot list s3://no-such-bucket"),
    ):
        idx.add("s3://no-such-bucket/photos")


def test_hostile_objects_cost_bounded_memory_and_odd_keys_round_trip(
    s3_server, tmp_path, tiny_vit, monkeypatch
):
    import simsearch.media.objects

    photos = {
        "odd/a photo with spaces & 100%.png": _png(1),
        "odd/café/日本.png": _png(2),
        "odd/../dots.png": _png(3),  # a literal key in S3, not a way out of the prefix
        "odd/big.png": _png(4) + b"\0" * 60_000,
    }
    bucket = s3_server(photos)
    # An object above the size limit is refused unread, as a file is.
    monkeypatch.setattr(simsearch.media.objects, "MAX_FILE_BYTES", 50_000)
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        summary = idx.add(f"{bucket}/odd")
        failed = {f.path: f.error for f in idx.failed()}
        paths = set(idx.store.known_files())
        hit = idx.search(f"{bucket}/odd/café/日本.png", k=1)[0]
    assert failed == {f"{bucket}/odd/big.png": failed[f"{bucket}/odd/big.png"]}
    assert "above the limit of 50,000" in failed[f"{bucket}/odd/big.png"]
    assert summary.indexed == len(paths) - 1
    assert f"{bucket}/odd/a photo with spaces & 100%.png" in paths
    assert hit.path == f"{bucket}/odd/café/日本.png"
    for path in paths - {f"{bucket}/odd/big.png"}:
        assert read_object(path) == photos[path.removeprefix(bucket + "/")]
