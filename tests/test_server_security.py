"""`simsearch serve` under attack: what a client elsewhere, a page in the user's browser or
someone who can write into the photo folders can make the server do, and that it holds.

Every answer to a bad request is JSON with an "error" (never a traceback, never a 500),
no file but an indexed image is ever sent, the token and the Host and Origin checks cannot
be talked round, bodies and hostile images stay within their bounds, and nothing put where
an indexed file was (a FIFO, /dev/zero, a link elsewhere) hangs a request or is served.
All in process through the ASGI client; the model is a tiny random ViT."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import threading
import time
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import _save_vit, draw_image, png_chunk, png_claiming
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from simsearch import Index
from simsearch.server.app import create_app
from simsearch.server.state import Server, Settings

TOKEN = "c0ffee-7e57-t0ken-5ecret"
MB = 2**20
JSON = {"content-type": "application/json"}


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory, tiny_vit) -> Path:
    """An index of 8 drawn images that no test here changes (those that do use
    index_path, a fresh one each)."""
    base = tmp_path_factory.mktemp("sec")
    photos = base / "photos"
    photos.mkdir()
    for i in range(8):
        draw_image(i).save(photos / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    with Index.create(base / "index", model=tiny_vit) as idx:
        idx.add(photos)
    return base / "index"


@contextmanager
def serving(index: Path, *, raise_errors: bool = True, **options):
    """A TestClient (lifespan run, so the server is closed after) over `index`, sending
    Host: localhost as a browser on this machine would."""
    settings = Settings(index=index, precision="fp32", **{"preload": False, **options})
    app = create_app(settings)
    with TestClient(
        app, base_url="http://localhost", raise_server_exceptions=raise_errors
    ) as client:
        yield client


def refused(response, *statuses: int) -> dict:
    """The JSON error body of `response`, after checking its status is one of `statuses`."""
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert "Traceback" not in response.text
    return body


def answered_within(seconds: float, request, unblock=None):
    """`request()`'s answer, run in a thread; fails (rather than hanging the run) when it
    takes longer than `seconds`, after calling `unblock()` to let the stuck thread go."""
    out: dict = {}

    def go():
        try:
            out["response"] = request()
        except BaseException as exc:  # reported below
            out["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive() and unblock is not None:
        unblock()
        thread.join(seconds)
        raise AssertionError(f"no answer after {seconds} s: it waited until unblocked")
    assert not thread.is_alive(), f"no answer after {seconds} s: it hangs"
    if "error" in out:
        raise out["error"]
    return out["response"], time.monotonic() - start


def peak_rss_growth(action) -> int:
    """Bytes the process's peak RSS grew by while `action()` ran (0 when it stayed under
    an earlier peak: a bound proven here is an upper bound on the growth)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    action()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_with_text_bomb() -> bytes:
    """A valid 8x8 PNG carrying a zTXt chunk that inflates to 64 MB."""
    png = encoded(Image.new("RGB", (8, 8), (10, 200, 30)), "PNG")
    bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 * MB), 9))
    at = png.index(b"IDAT") - 4  # before the IDAT chunk's length
    return png[:at] + bomb + png[at:]


def gif_of_many_frames(frames: int = 2000) -> bytes:
    first = draw_image(1, size=(64, 48)).convert("P")
    rest = [Image.new("P", (64, 48), i % 256) for i in range(frames - 1)]
    return encoded(first, "GIF", save_all=True, append_images=rest, duration=10, loop=0)


def ids_by_name(client) -> dict[str, int]:
    hits = client.get("/api/search", params={"id": 1, "k": 100}).json()["results"][0]["hits"]
    return {Path(h["path"]).name: h["id"] for h in hits}


# -- path traversal and hostile ids --------------------------------------------------------

TRAVERSALS = [
    "/api/images/..%2f..%2f..%2fetc%2fpasswd",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/images/%2e%2e/%2e%2e/etc/passwd",
    "/api/images/....//....//etc/passwd",
    "/api/images//etc/passwd",
    "/api/images/%2Fetc%2Fpasswd",
    "/api/images/1%00",
    "/api/images/1%00.jpg",
    "/api/images/1%2f..%2f..%2fetc%2fpasswd",
    "/api/images/99999999999999999999",
    "/api/images/9223372036854775808",  # one past SQLite's largest integer
    "/api/images/-9223372036854775809",
    "/api/images/-1",
    "/api/images/0",
    "/api/images/1e3",
    "/api/images/0x1",
    "/api/images/%EF%BC%91",  # a full-width digit one
    "/api/images/99999999999999999999/thumbnail",
    "/api/images/-1/thumbnail",
    "/api/images/..%2f..%2fetc%2fpasswd/thumbnail",
    "/api/images/1%00/thumbnail",
    "/api/images/1/thumbnail?size=99999999999999999999",
    "/api/images/1/thumbnail?size=-1",
    "/api/clusters/..%2f..%2fetc%2fpasswd",
    "/api/clusters/%2e%2e",
    "/api/clusters/-1",
    "/api/clusters/0",
    "/api/clusters/99999999999999999999",
    "/api/clusters/1%00",
    "/api/search?id=99999999999999999999",
    "/api/search?id=-1",
    "/api/search?id=..%2f..%2fetc%2fpasswd",
    "/api/search?id=1&id=9223372036854775808",
    "/api/failed?offset=99999999999999999999",
    "/static/..%2f..%2fapp.py",
    "/static/%2e%2e/%2e%2e/state.py",
    "/static/..%5c..%5capp.py",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
]


def test_no_id_or_name_reaches_a_file_outside_the_index(shared_index):
    """Every route that takes an id or name, given ../, its encodings, absolute paths, NUL
    bytes, ids past 64 bits and negative ones: 404/422/400 JSON, never a file, never 500."""
    secrets = [Path("/etc/passwd"), *Path(__file__).parents[1].glob("simsearch/server/*.py")]
    markers = [p.read_bytes()[:64] for p in secrets if p.is_file() and p.stat().st_size > 64]
    with serving(shared_index, raise_errors=False) as client:
        for url in TRAVERSALS:
            response = client.get(url)
            if response.status_code == 200:  # only the paging ones may answer, empty
                assert url.startswith("/api/failed") and response.json()["items"] == [], url
                continue
            refused(response, 400, 404, 422)
            assert not any(m in response.content for m in markers), url


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [2**64]},
        {"ids": [2**63]},
        {"ids": [-(2**63) - 1]},
        {"ids": [1], "negative_ids": [10**30]},
        {"ids": [-5]},
        {"ids": ["../../etc/passwd"]},
        {"ids": [1.5]},
        {"vectors": [[1.0] * 32, []]},  # ragged
        {"vectors": [[1.0] * 32, [1.0] * 31]},
        {"vectors": [[[1.0]] * 32]},
        {"vectors": [[1e308] * 32]},
        {"vectors": [["nan"] * 32]},
        {"negative_vectors": [[0.0] * 32], "ids": [1]},
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e308 squared
def test_hostile_ids_and_vectors_in_a_json_query(shared_index, body):
    with serving(shared_index, raise_errors=False) as client:
        refused(client.post("/api/query", json=body), 400, 404, 422)


@pytest.mark.parametrize(
    "ids", ["99999999999999999999", "-9223372036854775809", "1,../../etc/passwd", "1\x002"]
)
def test_hostile_ids_in_the_upload_form(shared_index, ids):
    with serving(shared_index, raise_errors=False) as client:
        refused(client.post("/api/search", data={"ids": ids}), 400, 404, 422)


def test_an_undo_names_a_manifest_of_the_move_folder_and_nothing_else(shared_index, tmp_path):
    """Names with ../, absolute paths, NUL, glob characters, or naming a manifest-looking
    file in another folder: 404 (or 422 past the length limit), nothing read."""
    moved, elsewhere = tmp_path / "moved", tmp_path / "elsewhere"
    moved.mkdir()
    elsewhere.mkdir()
    decoy = elsewhere / "simsearch-moves-20240101-000000.jsonl"
    decoy.write_text('{"kind": "not read"}\n')
    names = [
        f"../elsewhere/{decoy.name}",
        str(decoy),
        "../../etc/passwd",
        "/etc/passwd",
        "%2e%2e%2fetc%2fpasswd",
        f"{decoy.name}\x00.jsonl",
        "simsearch-moves-*.jsonl",
        "*",
        "",
        ".",
        "..",
    ]
    with serving(shared_index, raise_errors=False, move_to=moved) as client:
        for name in names:
            for confirm in (False, True):
                response = client.post(
                    "/api/moves/undo", json={"manifest": name, "confirm": confirm}
                )
                refused(response, 404)
        refused(client.post("/api/moves/undo", json={"manifest": "x" * 201}), 422)
    assert decoy.read_text() == '{"kind": "not read"}\n'


def let_a_reader_go(fifo: Path):
    """Open and close `fifo` for writing: a reader waiting in open() gets EOF."""
    with suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_or_a_device_named_like_a_manifest_is_refused_at_once(shared_index, tmp_path):
    """Someone who can write into the move folder: counting the lines of a FIFO waited
    forever, of a link to /dev/zero filled memory (here a link to /dev/null stands in for
    it, so that a regression fails this test instead of the machine)."""
    moved = tmp_path / "moved"
    moved.mkdir()
    fifo = moved / "simsearch-moves-20240101-000000.jsonl"
    os.mkfifo(fifo)
    (moved / "simsearch-moves-20240101-000001.jsonl").symlink_to("/dev/null")
    with serving(shared_index, raise_errors=False, move_to=moved) as client:
        listed, _ = answered_within(
            5, lambda: client.get("/api/moves"), lambda: let_a_reader_go(fifo)
        )
        assert listed.status_code == 200 and listed.json() == []
        for name in sorted(p.name for p in moved.iterdir()):
            for confirm in (False, True):
                body = {"manifest": name, "confirm": confirm}
                response, _ = answered_within(
                    5,
                    lambda body=body: client.post("/api/moves/undo", json=body),
                    lambda: let_a_reader_go(fifo),
                )
                assert "not a file" in refused(response, 400)["error"]


def test_moving_and_undoing_want_a_real_true_to_act(index_path, tmp_path):
    """pydantic's lax mode took "yes", "on" or 1 for confirm, and false for threshold 0
    (every pair a duplicate: all but one image moved)."""
    with serving(index_path, raise_errors=False, move_to=tmp_path / "moved") as client:
        for body in (
            {"threshold": 0.5, "confirm": "yes"},
            {"threshold": 0.5, "confirm": 1},
            {"threshold": 0.5, "confirm": "true"},
            {"threshold": False, "confirm": True},
            {"threshold": "0.5", "confirm": True},
            {"keep_ids": ["1"], "threshold": 0.5, "confirm": True},
        ):
            refused(client.post("/api/duplicates/move", json=body), 422)
        refused(client.post("/api/moves/undo", json={"manifest": "x", "confirm": "yes"}), 422)
        assert client.get("/api/info").json()["indexed"] == 8  # nothing moved


# -- the token ------------------------------------------------------------------------------


def test_the_token_is_required_and_cannot_be_guessed_by_parts(shared_index):
    with serving(shared_index, host="0.0.0.0", token=TOKEN) as client:
        missing = client.get("/api/info")
        refused(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = [
            TOKEN[:-1],  # a prefix of the right one
            TOKEN[:1],
            TOKEN + "x",
            TOKEN.upper(),
            TOKEN[::-1],
            "",
            "null",
        ]
        for token in wrong:
            refused(client.get("/api/info", headers={"authorization": f"Bearer {token}"}), 401)
            refused(client.get("/api/info", params={"token": token}), 401)
            refused(client.get("/api/info", headers={"cookie": f"simsearch_token={token}"}), 401)
        for header in (f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}", f"Bearer{TOKEN}"):
            refused(client.get("/api/info", headers={"authorization": header}), 401)
        assert "set-cookie" not in client.get("/api/info", params={"token": TOKEN[:-1]}).headers
        for url in ("/", "/openapi.json", "/api/docs", "/metrics", "/api/ready", "/api/index"):
            refused(client.get(url), 401)
        refused(client.post("/api/query", json={"ids": [1]}), 401)
        refused(client.post("/api/search", files={"images": ("a.png", b"x")}), 401)
        refused(client.get("/api/health/x"), 401)
        refused(client.get("/api//health"), 401)
        # the probe is open, and only it
        assert client.get("/api/health").json() == {"status": "ok"}
        right = client.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200 and right.json()["indexed"] == 8
        assert client.get("/api/info", headers={"authorization": f"bearer {TOKEN}"}).is_success


def test_the_token_in_the_url_sets_a_strict_http_only_cookie_that_then_works(shared_index):
    with serving(shared_index, host="0.0.0.0", token=TOKEN) as client:
        first = client.get("/api/info", params={"token": TOKEN})
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"simsearch_token={TOKEN};")
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert client.get("/api/info").status_code == 200  # the cookie jar sends it back
        assert "set-cookie" not in client.get("/api/info").headers  # set once, not again
        client.cookies.clear()
        refused(client.get("/api/info"), 401)
        alone = client.get("/api/info", headers={"cookie": f"simsearch_token={TOKEN}"})
        assert alone.status_code == 200


def test_an_empty_configured_token_lets_no_one_in(shared_index):
    """Settings(token="") (the CLI makes "" None, the library does not): an empty cookie
    or Bearer was taken for it."""
    with serving(shared_index, host="0.0.0.0", token="") as client:
        for headers in (
            {},
            {"cookie": "simsearch_token="},
            {"cookie": 'simsearch_token=""'},
            {"authorization": "Bearer "},
            {"authorization": "Bearer  "},
        ):
            refused(client.get("/api/info", headers=headers), 401)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
def test_the_cli_refuses_to_serve_other_machines_without_a_token(
    run, shared_index, monkeypatch, host
):
    started = []
    monkeypatch.delenv("SIMSEARCH_TOKEN", raising=False)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    monkeypatch.setattr("simsearch.server.app.create_app", lambda settings: settings)
    result = run("serve", "--index", shared_index, "--host", host)
    assert result.exit_code == 2 and "--token" in result.output and not started
    empty = run("serve", "--index", shared_index, "--host", host, "--token", "")
    assert empty.exit_code == 2 and not started
    # with a token it gets as far as serving (here: the stub)
    assert run("serve", "--index", shared_index, "--host", host, "--token", TOKEN).exit_code == 0
    assert started == [{"host": host, "port": 8000, "log_level": "warning", "access_log": False}]


# -- the Host header and cross-site requests ------------------------------------------------


def test_a_loopback_server_without_a_token_answers_only_to_its_own_names(shared_index):
    """DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends
    Host: evil.example; the server must not answer it."""
    with serving(shared_index) as client:
        for host in (
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "127.0.0.1.evil.example:8000",
            "[::1].evil.example",
            "0.0.0.0",
            "",
        ):
            refused(client.get("/api/info", headers={"host": host}), 403)
            refused(client.post("/api/query", json={"ids": [1]}, headers={"host": host}), 403)
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "::1"):
            assert client.get("/api/info", headers={"host": host}).status_code == 200, host


def test_cross_site_posts_are_refused_and_same_origin_ones_accepted(index_path, tmp_path):
    with serving(index_path, move_to=tmp_path / "moved") as client:
        for origin in (
            "https://evil.example",
            "http://evil.example",
            "http://testserver.evil.example",
            "http://localhost:8000",  # another port is another origin
            "null",  # a sandboxed iframe, a data: page
        ):
            headers = {"origin": origin}
            refused(client.post("/api/index", headers=headers), 403)
            refused(client.post("/api/query", json={"ids": [1]}, headers=headers), 403)
            body = {"threshold": 0.5, "confirm": True}
            refused(client.post("/api/duplicates/move", json=body, headers=headers), 403)
            upload = {"images": ("a.png", encoded(draw_image(1), "PNG"))}
            refused(client.post("/api/search", files=upload, headers=headers), 403)
        assert client.get("/api/index").json()["version"] == 0  # no run was started
        assert client.get("/api/info").json()["indexed"] == 8  # nothing moved
        same = client.post("/api/query", json={"ids": [1]}, headers={"origin": "http://localhost"})
        assert same.status_code == 200
        assert client.post("/api/query", json={"ids": [1]}).status_code == 200  # no Origin: curl


def test_no_page_elsewhere_may_embed_or_read_what_the_server_sends(index_path):
    """Cross-Origin-Resource-Policy: a page elsewhere cannot show the photos of a loopback
    server in <img> tags (and learn their ids and sizes); with --cors the origins named
    may."""
    with serving(index_path) as client:
        for url in ("/api/images/1", "/api/images/1/thumbnail", "/api/info", "/api/nothing"):
            assert client.get(url).headers["cross-origin-resource-policy"] == "same-origin", url
    allowed = "https://photos.example"
    with serving(index_path, cors=(allowed,)) as client:
        answer = client.post("/api/query", json={"ids": [1]}, headers={"origin": allowed})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == allowed
        assert "cross-origin-resource-policy" not in answer.headers
        refused(client.post("/api/index", headers={"origin": "https://evil.example"}), 403)


# -- uploads ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(shared_index):
    limit = 10_000
    too_much = b"x" * (limit + 1)

    def chunked(n: int = 40, size: int = 1000):  # no Content-Length: Transfer-Encoding chunked
        for _ in range(n):
            yield b"y" * size

    with serving(shared_index, max_upload=limit) as client:
        multipart = {"content-type": "multipart/form-data; boundary=xyz"}
        for response in (
            client.post("/api/search", content=too_much, headers=multipart),
            client.post("/api/search", files={"images": ("a.jpg", too_much)}),
            client.post("/api/query", content=too_much, headers=JSON),
            client.post("/api/search", content=chunked(), headers=multipart),
            client.post("/api/query", content=chunked(), headers=JSON),
            client.post("/api/duplicates/move", content=chunked(), headers=JSON),
        ):
            body = refused(response, 413)
            assert body["type"] == "PayloadTooLarge" and "10,000 bytes" in body["error"]
        under = client.post("/api/query", content=json.dumps({"ids": [1]}).encode())
        assert under.status_code in (200, 422)  # not 413: the limit is the body's size


def test_a_streamed_body_without_content_length_is_cut_off_at_the_limit(shared_index):
    """A raw ASGI call, no Content-Length, 1 MB chunks forever: the app stops reading
    at the limit and answers 413 (it does not read the 100 MB)."""
    settings = Settings(index=shared_index, precision="fp32", preload=False, max_upload=2 * MB)
    app = create_app(settings)
    pulled = 0

    async def receive():
        nonlocal pulled
        pulled += 1
        more = pulled < 100
        return {"type": "http.request", "body": b"\0" * MB, "more_body": more}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/query", "raw_path": b"/api/query", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
    }  # fmt: skip
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        app.state.server.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body)["type"] == "PayloadTooLarge"
    assert pulled <= 4  # stopped at the limit


HOSTILE_UPLOADS = {
    "bomb.png": (png_claiming(50_000, 50_000), "above the limit"),
    "bomb-just-over.png": (png_claiming(13_000, 13_000), "above the limit"),
    "truncated.jpg": (encoded(draw_image(21, (400, 300)), "JPEG", quality=95)[:3000], "truncated"),
    "random.jpg": (os.urandom(4096), "not an image"),
    "empty.jpg": (b"", "empty"),
    "text.jpg": (b"hello, this is a text file, not a JPEG\n", "not an image"),
    "image.svg": (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
        b"<script>alert(document.domain)</script></svg>",
        "not an image",
    ),
    "page.html": (b"<!doctype html><script>alert(document.domain)</script>", "not an image"),
    "<img src=x onerror=alert(1)>.png": (b"<script>alert(1)</script>", "not an image"),
    "eps.jpg": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    "text-bomb.png": (png_with_text_bomb(), "cannot decode"),
}


@pytest.mark.parametrize("name", list(HOSTILE_UPLOADS))
def test_a_hostile_upload_is_400_with_the_reason(shared_index, name):
    data, reason = HOSTILE_UPLOADS[name]
    with serving(shared_index) as client:
        response = client.post("/api/search", files={"images": (name, data, "image/jpeg")})
        body = refused(response, 400)
        assert body["type"] == "ImageError"
        assert name in body["error"] and reason in body["error"], body["error"]
        assert b"<script>" not in data or response.headers["content-type"] == "application/json"


def test_a_decompression_bomb_costs_no_memory(shared_index):
    with serving(shared_index) as client:
        client.post("/api/search", files={"images": ("warm.png", encoded(draw_image(1), "PNG"))})
        responses = []

        def bombs():
            for side in (50_000, 100_000, 65_535):
                files = {"images": (f"bomb{side}.png", png_claiming(side, side), "image/png")}
                responses.append(client.post("/api/search", files=files))

        grown = peak_rss_growth(bombs)
        for response in responses:
            refused(response, 400)
        assert grown < 200 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


def test_large_small_files_are_reduced_as_they_are_decoded(shared_index):
    """12000x12000 PNGs of one grey (165 KB each) were held at full size until embedded,
    576 MB each (64 of them fit the upload limit); decoded as the indexer does, each is
    reduced at once."""
    grey = encoded(Image.new("L", (12_000, 12_000), 128), "PNG")
    assert len(grey) < 300_000
    with serving(shared_index) as client:
        client.post("/api/search", files={"images": ("warm.png", encoded(draw_image(1), "PNG"))})
        answer = {}

        def upload():
            files = [("images", (f"grey{i}.png", grey, "image/png")) for i in range(2)]
            answer["r"] = client.post("/api/search", files=files)

        grown = peak_rss_growth(upload)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["results"]) == 2
        assert grown < 400 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


@pytest.mark.slow
def test_many_clients_uploading_at_once_share_a_bounded_decoder(shared_index):
    """Eight clients at once, each a 12000x12000 PNG: decoded in the requests' own threads
    the allocator kept a decode's memory for each (1.5 GB for 12); two decoder threads."""
    grey = encoded(Image.new("L", (12_000, 12_000), 128), "PNG")
    with serving(shared_index) as client:
        client.post("/api/search", files={"images": ("warm.png", grey, "image/png")})
        codes: list[int] = []

        def upload():
            files = {"images": ("grey.png", grey, "image/png")}
            codes.append(client.post("/api/search", files=files).status_code)

        def all_at_once():
            threads = [threading.Thread(target=upload) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        grown = peak_rss_growth(all_at_once)
        assert codes == [200] * 8
        assert grown < 600 * MB, f"peak RSS grew by {grown / MB:.0f} MB"


def test_a_gif_of_many_frames_is_read_for_its_first_frame_only(shared_index):
    gif = gif_of_many_frames(2000)
    with serving(shared_index) as client:
        client.post("/api/search", files={"images": ("warm.png", encoded(draw_image(1), "PNG"))})
        files = {"images": ("many.gif", gif, "image/gif")}
        response, took = answered_within(20, lambda: client.post("/api/search", files=files))
        assert response.status_code == 200, response.text
        assert took < 5, f"{took:.1f} s for one GIF"


@pytest.fixture(scope="module")
def shortest_edge_index(tmp_path_factory) -> Path:
    """An index whose model resizes the shortest edge (as CLIP's and most checkpoints'
    do), so that a very thin image is one it refuses."""
    from transformers import CLIPImageProcessor

    base = tmp_path_factory.mktemp("se")
    model = _save_vit(base / "vit", seed=0)
    (model / "preprocessor_config.json").unlink()
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(model)
    (base / "photos").mkdir()
    for i in range(4):
        draw_image(i).save(base / "photos" / f"img{i}.png")
    with Index.create(base / "index", model=model) as idx:
        idx.add(base / "photos")
    return base / "index"


def test_a_thin_image_fails_its_own_request_not_the_others_batched_with_it(
    shortest_edge_index,
):
    """Uploads from concurrent clients are embedded in one batch; an image too thin for
    the model's resize failed the whole batch, every other client's search with it."""
    thin = encoded(Image.new("L", (1, 200_000), 128), "PNG")
    good = encoded(draw_image(2), "PNG")
    with serving(shortest_edge_index, window=1.0) as client:  # a long batching window
        client.app.state.server.load_model()
        out: dict = {}

        def upload(name, data):
            out[name] = client.post("/api/search", files={"images": (name, data, "image/png")})

        threads = [
            threading.Thread(target=upload, args=("good.png", good)),
            threading.Thread(target=upload, args=("thin.png", thin)),
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # both inside the one window
        for thread in threads:
            thread.join()
        assert "too thin" in refused(out["thin.png"], 400)["error"]
        assert out["good.png"].status_code == 200, out["good.png"].text


# -- what is served back -----------------------------------------------------------------


def test_an_original_is_never_sent_as_a_page(tmp_path, tiny_vit):
    """Files named directly are indexed whatever their suffix: a PNG called page.html or
    x.svg (or one that is a page too) was sent as text/html or image/svg+xml, inline, and
    ran as a page of the server's origin."""
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["page.html", "drawing.svg", "data.xml", "notes.txt", "photo.jpg", "scan.png"]
    for i, name in enumerate(names):
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        draw_image(i).save(photos / name, fmt)
    with Index.create(tmp_path / "index", model=tiny_vit) as idx:
        idx.add([photos / name for name in names])
    with serving(tmp_path / "index") as client:
        found = ids_by_name(client)
        assert set(found) == set(names)
        for name, image_id in found.items():
            response = client.get(f"/api/images/{image_id}")
            assert response.status_code == 200
            assert response.content == (photos / name).read_bytes()
            kind = response.headers["content-type"]
            expected = {"photo.jpg": "image/jpeg", "scan.png": "image/png"}
            assert kind == expected.get(name, "application/octet-stream"), (name, kind)
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "sandbox" in response.headers["content-security-policy"]


# -- the index holding hostile entries ---------------------------------------------------


def test_what_is_put_where_an_indexed_file_was_is_never_served_and_never_hangs(
    index_path, photo_dir, tmp_path
):
    """Someone who can write into a photo folder replaces indexed files: by a FIFO, links to
    /dev/zero, to a secret elsewhere, to /proc/self/environ, by a folder, by an SVG page.
    The original and the thumbnail answer at once with a JSON error, sending none of it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET: the key is 42\n")
    with serving(index_path, raise_errors=False) as client:
        found = ids_by_name(client)
        replaced = {
            "img0.jpg": lambda p: os.mkfifo(p),
            "img1.png": lambda p: p.symlink_to("/dev/zero"),
            "img2.jpg": lambda p: p.symlink_to(secret),
            "img3.png": lambda p: p.symlink_to("/proc/self/environ"),
            "img4.jpg": lambda p: p.mkdir(),
            "img5.png": lambda p: p.write_text('<svg xmlns="http://www.w3.org/2000/svg">'
                                               "<script>alert(1)</script></svg>"),
        }  # fmt: skip
        for name, replace in replaced.items():
            path = photo_dir / name
            path.unlink()
            replace(path)
        environ = "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode()[:40]
        fifo = photo_dir / "img0.jpg"
        for name in replaced:
            for url in (f"/api/images/{found[name]}", f"/api/images/{found[name]}/thumbnail"):
                response, took = answered_within(
                    5, lambda url=url: client.get(url), lambda: let_a_reader_go(fifo)
                )
                refused(response, 400, 404)
                assert took < 2, (url, took)
                assert b"TOP SECRET" not in response.content
                assert environ not in response.content and b"<script>" not in response.content
        # the others are still served
        assert client.get(f"/api/images/{found['img6.jpg']}").status_code == 200
        assert client.get(f"/api/images/{found['img7.png']}/thumbnail").status_code == 200


def test_an_edited_file_is_refused_until_indexed_again(index_path, photo_dir):
    """A link swapped in, then given the old mtime can only point at a file its maker owns
    (one they can read anyway); a changed file is the common case, and is refused."""
    with serving(index_path, raise_errors=False) as client:
        image_id = ids_by_name(client)["img6.jpg"]
        path = photo_dir / "img6.jpg"
        draw_image(30).save(path, quality=90)
        assert (
            "changed since it was indexed"
            in refused(client.get(f"/api/images/{image_id}"), 400)["error"]
        )
        refused(client.get(f"/api/images/{image_id}/thumbnail"), 400)
    with Index.open(index_path) as idx:
        idx.add(photo_dir)
    with serving(index_path) as client:
        again = client.get(f"/api/images/{ids_by_name(client)['img6.jpg']}")
        assert again.status_code == 200 and again.content == path.read_bytes()


# -- errors ------------------------------------------------------------------------------


def test_an_unexpected_error_is_a_500_in_json_without_its_traceback(shared_index, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("database password is hunter2, at /srv/secret/path")

    with serving(shared_index, raise_errors=False) as client:
        for method, url, patched in (
            ("GET", "/api/search?id=1", "describe"),
            ("GET", "/api/images/1/thumbnail", "thumbnail"),
            ("GET", "/api/images/1", "image_path"),
            ("POST", "/api/query", "search"),
        ):
            with monkeypatch.context() as m:
                m.setattr(Server, patched, boom)
                response = client.request(
                    method, url, json={"ids": [1]} if method == "POST" else None
                )
            assert response.status_code == 500, (url, response.text)
            assert response.json() == {
                "error": "internal error (the server log has the details)",
                "type": "InternalError",
            }
            for leak in ("hunter2", "/srv/secret", "RuntimeError", "Traceback", 'File "'):
                assert leak not in response.text
        assert client.get("/api/search?id=1").status_code == 200  # and it goes on


def test_unknown_routes_and_methods_answer_json(shared_index):
    with serving(shared_index) as client:
        assert refused(client.get("/api/nothing"), 404)["type"] == "NotFound"
        assert refused(client.delete("/api/info"), 405)["type"] == "MethodNotAllowed"
        assert refused(client.put("/api/query", json={}), 405)["type"] == "MethodNotAllowed"
        not_json = client.post("/api/query", content=b"{not json", headers=JSON)
        body = refused(not_json, 422)
        assert body["type"] == "ValidationError"
