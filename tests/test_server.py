"""`simsearch serve`: the HTTP API through the ASGI test client, and the Python Client
against a real server. What a browser or a script relies on: the same answers as `Index`,
errors as JSON, moves only when confirmed and undoable, searches that keep answering while
the background index run writes."""

from __future__ import annotations

import io
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import draw_image
from fastapi.testclient import TestClient

from simsearch import Index
from simsearch.server.app import create_app
from simsearch.server.batching import EmbedBatcher
from simsearch.server.state import Settings

LOCAL = "http://localhost"  # the Host a loopback server without a token answers


def _png(i: int, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    draw_image(i, size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def served(index_path, tmp_path):
    """A test client of a server over index_path, moving duplicates to tmp_path/moved."""
    settings = Settings(index=index_path, precision="fp32", move_to=tmp_path / "moved")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        yield client


def test_search_by_id_upload_and_vector_agree_with_the_index(served, index_path, photo_dir):
    with Index.open(index_path) as idx:
        expected = idx.search(3, k=4)
        vector = idx.store.vector(3)
    by_id = served.get("/api/search", params={"id": 3, "k": 4})
    assert by_id.status_code == 200
    (result,) = by_id.json()["results"]
    assert result["query"] == "id:3"
    assert [(h["id"], h["path"]) for h in result["hits"]] == [(h.id, h.path) for h in expected]
    first = result["hits"][0]
    assert first["size"] == (photo_dir / first["path"].rsplit("/", 1)[-1]).stat().st_size or 1
    assert (first["width"], first["height"]) == (96, 72)

    upload = served.post(
        "/api/search",
        files=[("images", ("q.png", (photo_dir / "img1.png").read_bytes(), "image/png"))],
        data={"k": "2"},
    )
    assert upload.status_code == 200, upload.text
    hits = upload.json()["results"][0]["hits"]
    assert hits[0]["path"] == str(photo_dir / "img1.png") and hits[0]["score"] > 0.999

    by_vector = served.post("/api/query", json={"vectors": [(vector * 5).tolist()], "k": 1})
    assert by_vector.json()["results"][0]["hits"][0]["id"] == 3  # normalised by the server


def test_several_queries_at_once_keep_their_order(served):
    answer = served.post("/api/query", json={"ids": [5, 2, 7], "k": 1}).json()["results"]
    assert [r["query"] for r in answer] == ["id:5", "id:2", "id:7"]
    assert [r["hits"][0]["id"] for r in answer] == [5, 2, 7]
    both = served.get("/api/search", params=[("id", 4), ("id", 1), ("k", 1)]).json()
    assert [r["hits"][0]["id"] for r in both["results"]] == [4, 1]


def test_negative_examples_push_their_neighbours_down(served, index_path):
    with Index.open(index_path) as idx:
        a, b = idx.store.vector(1), idx.store.vector(2)
    answer = served.post("/api/query", json={"ids": [1], "negative_ids": [2], "k": 8}).json()[
        "results"
    ]
    assert [r["query"] for r in answer] == ["combined"]
    hits = answer[0]["hits"]
    query = (a - b) / np.linalg.norm(a - b)
    with Index.open(index_path) as idx:
        assert [h["id"] for h in hits] == [h.id for h in idx.search(query, k=8)]
    # "Not like this": the negative falls below where it ranks by the positive alone.
    plain = served.get("/api/search", params={"id": 1, "k": 8}).json()["results"][0]["hits"]
    ranks = [[h["id"] for h in found].index(2) for found in (plain, hits)]
    assert ranks[1] > ranks[0]
    assert next(h["score"] for h in hits if h["id"] == 2) < 0
    cancel = served.post("/api/query", json={"ids": [1], "negative_ids": [1]})
    assert cancel.status_code == 400 and "cancel out" in cancel.json()["error"]


def test_bad_queries_are_json_errors_with_their_fields(served):
    missing = served.get("/api/search", params={"id": 999})
    assert missing.status_code == 404 and missing.json()["type"] == "NotFound"
    assert served.post("/api/query", json={}).status_code == 400
    wrong_dim = served.post("/api/query", json={"vectors": [[1.0, 2.0]]})
    assert wrong_dim.status_code == 400 and wrong_dim.json()["param"] == "vectors"
    zero = served.post("/api/query", json={"vectors": [[0.0] * 32]})
    assert zero.status_code == 400
    too_many = served.get("/api/search", params={"id": 1, "k": 100_000})
    assert too_many.status_code == 422 and "k" in too_many.json()["error"]
    no_labels = served.get("/api/search", params={"id": 1, "label": "cat"})
    assert no_labels.status_code == 400 and no_labels.json()["fix"] == "add-labels"
    not_an_image = served.post("/api/search", files=[("images", ("x.jpg", b"not an image"))])
    assert not_an_image.status_code == 400 and "x.jpg" in not_an_image.json()["error"]


def test_the_original_and_a_cached_thumbnail_behind_an_id(served, photo_dir):
    original = served.get("/api/images/2")
    assert original.status_code == 200
    assert original.headers["content-type"] == "image/png"
    assert original.content == (photo_dir / "img1.png").read_bytes()
    thumb = served.get("/api/images/2/thumbnail", params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    (photo_dir / "img1.png").unlink()  # made once: the cached one is still served
    assert served.get("/api/images/2/thumbnail", params={"size": 64}).content == thumb.content
    gone = served.get("/api/images/2")
    assert gone.status_code == 404 and "cannot be read" in gone.json()["error"]


def test_info_failed_and_clusters(served, index_path, photo_dir):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 nothing")
    with Index.open(index_path) as idx:
        idx.add(photo_dir)
        idx.cluster(2)
    info = served.get("/api/info").json()
    assert info["indexed"] == 8 and info["failed"] == 1
    assert info["roots"] == [str(photo_dir)]
    failed = served.get("/api/failed").json()
    assert failed["total"] == 1 and failed["items"][0]["path"].endswith("broken.jpg")
    clusters = served.get("/api/clusters", params={"top": 2}).json()
    assert clusters["run"]["clusters"] == 2
    sizes = [c["size"] for c in clusters["clusters"]]
    assert sum(sizes) == 8
    members = served.get("/api/clusters/1", params={"limit": 3}).json()
    assert members["total"] == sizes[0] and len(members["items"]) == min(3, sizes[0])
    assert all(h["cluster"] == 1 for h in members["items"])
    assert served.get("/api/clusters/9").status_code == 404
    within = served.get("/api/search", params={"id": 1, "k": 8, "cluster": 2}).json()
    assert all(h["cluster"] == 2 for h in within["results"][0]["hits"])


@pytest.fixture
def with_copy(index_path, photo_dir):
    """img0.jpg and a smaller copy of it in the index: one duplicate group."""
    draw_image(0).resize((80, 60)).save(photo_dir / "img0-small.jpg", quality=90)
    with Index.open(index_path) as idx:
        idx.add(photo_dir)
        copy, original, other = idx.search(photo_dir / "img0-small.jpg", k=3)
        assert original.path == str(photo_dir / "img0.jpg")
        # The tiny random model scores every pair high: cut between the copy and the rest.
        threshold = round((original.score + other.score) / 2, 6)
        groups = idx.duplicates(threshold)
    assert len(groups) == 1, groups
    return copy.id, groups[0], threshold


def test_duplicates_are_paged_and_move_only_when_confirmed_then_undo(
    served, with_copy, photo_dir, tmp_path
):
    copy_id, group, threshold = with_copy
    calibrate = served.get("/api/duplicates")
    assert calibrate.status_code == 400 and calibrate.json()["fix"] == "calibrate"
    page = served.get("/api/duplicates", params={"threshold": threshold}).json()
    assert (page["total"], page["threshold"]) == (1, threshold)
    (found,) = page["items"]
    assert found["keep_path"] == str(photo_dir / "img0.jpg")
    assert found["keep_facts"]["width"] == 96
    assert [d["id"] for d in found["duplicates"]] == [copy_id]
    assert found["duplicates"][0]["why"] == "higher resolution"
    second = served.get("/api/duplicates", params={"threshold": threshold, "offset": 1})
    assert second.json()["items"] == []

    body = {"keep_ids": [group.keep_id], "threshold": threshold}
    dry = served.post("/api/duplicates/move", json=body).json()
    assert dry["dry_run"] and dry["files"] == 1
    assert dry["moves"][0]["path"] == str(photo_dir / "img0-small.jpg")
    assert (photo_dir / "img0-small.jpg").exists()  # a dry run moves nothing

    moved = served.post("/api/duplicates/move", json={**body, "confirm": True}).json()
    assert not moved["dry_run"] and moved["files"] == 1 and "/" not in moved["manifest"]
    assert not (photo_dir / "img0-small.jpg").exists()
    assert list((tmp_path / "moved").rglob("img0-small.jpg"))
    assert served.get("/api/search", params={"id": copy_id}).status_code == 404
    manifests = served.get("/api/moves").json()
    assert [(m["name"], m["moves"]) for m in manifests] == [(moved["manifest"], 1)]

    name = moved["manifest"]
    assert served.post("/api/moves/undo", json={"manifest": name}).json()["dry_run"]
    assert not (photo_dir / "img0-small.jpg").exists()
    back = served.post("/api/moves/undo", json={"manifest": name, "confirm": True}).json()
    assert back["files"] == 1 and (photo_dir / "img0-small.jpg").exists()
    assert served.get("/api/info").json()["indexed"] == 9  # back in the index (a new id)
    outside = served.post("/api/moves/undo", json={"manifest": "../" + name, "confirm": True})
    assert outside.status_code == 404


def test_moving_is_off_without_a_move_folder(index_path, with_copy):
    threshold = with_copy[2]
    app = create_app(Settings(index=index_path, precision="fp32"))
    with TestClient(app, base_url=LOCAL) as client:
        off = client.post("/api/duplicates/move", json={"threshold": threshold, "confirm": True})
    assert off.status_code == 400 and off.json()["param"] == "move_to"


def test_a_background_index_run_while_searches_keep_answering(served, photo_dir):
    for i in range(20, 36):
        draw_image(i).save(photo_dir / f"new{i}.png")
    started = served.post("/api/index")
    assert started.status_code == 202 and started.json()["running"]
    assert served.post("/api/index").status_code in (202, 409)  # one run at a time
    answered = 0
    while served.get("/api/index").json()["running"]:
        assert served.get("/api/search", params={"id": 1, "k": 3}).status_code == 200
        answered += 1
        time.sleep(0.01)
    status = served.get("/api/index").json()
    assert status["error"] is None and status["summary"]["indexed"] == 16, status
    assert status["done"] == status["total"] == 16
    assert answered >= 1
    # The reader sees the writer's images once it has published them.
    upload = [("images", ("q.png", (photo_dir / "new25.png").read_bytes(), "image/png"))]
    hit = served.post("/api/search", files=upload, data={"k": "1"}).json()
    assert hit["results"][0]["hits"][0]["path"] == str(photo_dir / "new25.png")


def test_health_readiness_and_metrics(served):
    assert served.get("/api/health").json() == {"status": "ok"}
    for _ in range(50):
        if served.get("/api/ready").status_code == 200:
            break
        time.sleep(0.1)
    assert served.get("/api/ready").json() == {"ready": True, "model": "loaded"}
    served.get("/api/search", params={"id": 1})
    served.post("/api/search", files=[("images", ("q.png", _png(3)))])
    text = served.get("/metrics").text
    assert 'simsearch_requests_total{method="GET",route="/api/search",status="200"} 1' in text
    assert "simsearch_model_batch_images_count 1" in text
    assert "simsearch_index_images 8" in text
    schema = served.get("/openapi.json").json()
    assert {"/api/search", "/api/query", "/api/duplicates/move"} <= set(schema["paths"])
    assert served.get("/").headers["content-type"].startswith("text/html")


def test_the_batcher_embeds_concurrent_requests_together():
    sizes, lock = [], threading.Lock()

    def embed(images):
        time.sleep(0.05)  # a forward pass
        with lock:
            sizes.append(len(images))
        return np.array([[float(x)] for x in images], np.float32)

    batcher = EmbedBatcher(embed, max_batch=16, window=0.05)
    results = {}

    def client(n):
        results[n] = batcher.embed([n, n + 100])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert sum(sizes) == 16 and max(sizes) > 2  # batched, and nothing lost
    for n, vectors in results.items():
        assert vectors[:, 0].tolist() == [n, n + 100]  # each caller gets its own rows


def test_the_batcher_gives_each_caller_the_model_error():
    def embed(images):
        raise RuntimeError("model on fire")

    batcher = EmbedBatcher(embed, window=0.0)
    with pytest.raises(RuntimeError, match="on fire"):
        batcher.embed(["x"])
    batcher.close()


@pytest.mark.e2e
def test_the_python_client_matches_the_index(index_path, photo_dir):
    import uvicorn

    from simsearch import Client
    from simsearch.errors import RemoteError

    app = create_app(Settings(index=index_path, precision="fp32", token="s3cret"))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        remote = Client(f"http://127.0.0.1:{port}", token="s3cret")
        with Index.open(index_path) as local:
            query = photo_dir / "img2.jpg"
            assert remote.search(query, k=3) == local.search(query, k=3)
            assert remote.search(4, k=2) == local.search(4, k=2)
            assert remote.search_many(["id:5", query, 1], k=1) == local.search_many(
                ["id:5", query, 1], k=1
            )
            vector = local.store.vector(6)
            assert remote.search(vector, k=1)[0].id == 6
            assert remote.info()["indexed"] == len(local)
        with pytest.raises(RemoteError) as err:
            remote.search(999)
        assert err.value.status == 404
        with pytest.raises(RemoteError) as denied:
            Client(f"http://127.0.0.1:{port}").search(1)
        assert denied.value.status == 401
    finally:
        server.should_exit = True
        thread.join(10)


def test_roots_are_recorded_once_in_the_order_given(tmp_path, tiny_vit, photo_dir):
    other = tmp_path / "other"
    shutil.copytree(photo_dir / "sub", other)
    with Index.create(tmp_path / "ix", model=tiny_vit) as idx:
        idx.add(photo_dir)
        idx.add([other, photo_dir])
        assert idx.roots() == [str(photo_dir), str(other)]


def test_calibrating_from_the_api_makes_the_default_threshold(served):
    assert served.get("/api/duplicates").json()["fix"] == "calibrate"
    found = served.post("/api/duplicates/calibrate")
    assert found.status_code == 200, found.text
    threshold = found.json()["threshold"]
    assert 0 < threshold <= 1
    page = served.get("/api/duplicates").json()
    assert page["threshold"] == threshold


def test_one_bad_request_does_not_fail_the_others_batched_with_it():
    def embed(images):
        time.sleep(0.02)
        if "poison" in images:
            raise ValueError("cannot embed poison")
        return np.array([[float(len(x))] for x in images], np.float32)

    batcher = EmbedBatcher(embed, max_batch=16, window=0.1)
    outcomes = {}

    def client(name):
        try:
            outcomes[name] = batcher.embed([name])[0, 0]
        except ValueError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "bb", "poison", "ccc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert outcomes == {"a": 1.0, "bb": 2.0, "poison": "cannot embed poison", "ccc": 3.0}
