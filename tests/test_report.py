"""HTML reports: self-contained pages whose every thumbnail renders in a real browser, paths
shown literally, unreadable images as placeholders, written atomically, and the CLI's --html.

The browser checks run headless Chromium (Debian: `apt-get install chromium`) and are
skipped where none is installed; each test makes them last, so that the checks on the HTML
itself run (and can fail) everywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import draw_image
from PIL import Image

from simsearch.errors import ReportError
from simsearch.media.header import header_facts
from simsearch.ops import report
from simsearch.records import Duplicate, DuplicateGroup, FileFacts, Hit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to a copy of a page, never to the page itself: once the page has loaded, it
# writes what the browser made of every <img> into the DOM, which --dump-dom then prints.
PROBE = """<script>
addEventListener("load", () => {
  const images = [...document.images].map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const missing = document.querySelectorAll(".missing").length;
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({images, missing});
  document.body.append(pre);
});
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium installed (apt-get install chromium); browser check skipped")


def render(page: Path, tmp_path: Path) -> dict:
    """Open `page` in headless Chromium; return what it rendered: {images: [...], missing}."""
    browser = _browser()
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text("utf-8").replace("</body>", PROBE + "</body>"), "utf-8")
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            # Lets the page finish loading and run its load handler before the DOM is dumped.
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium printed no render check (exit {done.returncode}): {done.stderr}"
    return json.loads(html.unescape(found.group(1)))


def assert_all_rendered(result: dict, images: int, missing: int = 0) -> None:
    assert len(result["images"]) == images
    for img in result["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
    assert result["missing"] == missing


def thumbnails(page: Path) -> list[Image.Image]:
    """Decode every <img> of a page, asserting that each is an embedded JPEG."""
    text = page.read_text("utf-8")
    sources = re.findall(r'<img src="([^"]*)"', text)
    out = []
    for src in sources:
        assert src.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "JPEG"
        out.append(img)
    return out


@pytest.fixture
def pictures(tmp_path) -> list[str]:
    """Six drawn images (JPEG and PNG, one large photo-sized JPEG), as absolute paths."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths = []
    for i in range(6):
        size = (1600, 1200) if i == 0 else (96, 72)
        path = folder / (f"p{i}.jpg" if i % 2 == 0 else f"p{i}.png")
        draw_image(i, size).save(path, quality=90)
        paths.append(str(path))
    return paths


@dataclass(frozen=True)
class FakeCluster:
    """A cluster as cluster_page takes it (the real ones live on another branch)."""

    id: int
    size: int
    central: tuple[Hit, ...]


def test_search_page_renders_every_thumbnail(tmp_path, pictures):
    hits = [Hit(i, p, 1.0 - i / 10) for i, p in enumerate(pictures)]
    page = tmp_path / "search.html"
    shown = report.search_page([(pictures[0], hits), ("id:3", hits[3:])], page)
    # First query: its file plus 6 hits; "id:3": hit 3's image as the query, plus 3 hits.
    assert shown == 7 + 4
    thumbs = thumbnails(page)
    assert thumbs[0].size == (256, 192)  # the 1600x1200 photo, longest side 256
    assert thumbs[2].size == (96, 72)  # small images are not enlarged
    text = page.read_text("utf-8")
    assert ">#1</b><b class=score" in text and ">0.9000</b>" in text
    assert text.count('<figure class="query">') == 2
    assert_all_rendered(render(page, tmp_path), 11)


def test_dedup_page_marks_the_kept_image_and_shows_sizes(tmp_path, pictures):
    big = FileFacts(4000, 3000, "JPEG", False, 3_100_000, 1_700_000_000 * 10**9)
    small = FileFacts(1280, 960, "WEBP", False, 210_000, 1_700_000_000 * 10**9)
    groups = [
        DuplicateGroup(
            0, pictures[0], (Duplicate(1, pictures[1], 0.987, small, "higher resolution"),), big
        ),
        DuplicateGroup(
            2, pictures[2], (Duplicate(3, pictures[3], 0.99), Duplicate(4, pictures[4], 0.96))
        ),
    ]
    page = tmp_path / "dedup.html"
    assert report.dedup_page(groups, page, threshold=0.95) == 5
    text = page.read_text("utf-8")
    assert "2 groups, 3 duplicates at similarity 0.95 or more" in text
    keeps = re.findall(r'<figure class="keep">.*?</figure>', text)
    assert len(keeps) == 2 and "p0.jpg" in keeps[0] and "p2.jpg" in keeps[1]
    # The facts the keep rule compared, as the CLI shows them, and why the copy lost.
    assert "4000x3000 JPEG lossy, 3.1 MB, 2023-11-1" in keeps[0]
    assert "1280x960 WEBP lossy, 210 KB" in text and "kept: higher resolution" in text
    assert ">0.9870</b>" in text
    assert_all_rendered(render(page, tmp_path), 5)


def test_cluster_page_takes_any_object_with_id_size_and_central(tmp_path, pictures):
    clusters = [
        FakeCluster(7, 120, tuple(Hit(i, p, 0.9 - i / 100) for i, p in enumerate(pictures[:4]))),
        FakeCluster(8, 2, (Hit(4, pictures[4], 0.8), Hit(5, pictures[5], 0.7))),
    ]
    page = tmp_path / "clusters.html"
    assert report.cluster_page(clusters, page) == 6
    text = page.read_text("utf-8")
    assert "Cluster 7 <small>120 images</small>" in text and "and 116 more" in text
    assert "2 clusters of 122 images" in text
    assert_all_rendered(render(page, tmp_path), 6)


def test_page_is_self_contained(tmp_path, pictures):
    page = tmp_path / "search.html"
    report.search_page([(pictures[1], [Hit(0, pictures[0], 0.5)])], page)
    text = page.read_text("utf-8")
    assert len(thumbnails(page)) == 2
    # Nothing is fetched: no external images, stylesheets, scripts or fonts.
    assert not re.search(r'src="(?!data:)', text)
    assert "<link" not in text and "<script" not in text and "url(" not in text
    # Links to the originals are file:// URIs, with the path percent-encoded.
    assert f'href="{Path(pictures[0]).as_uri()}"' in text


def test_paths_are_shown_literally_never_as_markup(tmp_path):
    odd = tmp_path / "a <b>&\"x'.png"
    draw_image(1).save(odd)
    page = tmp_path / "dedup.html"
    report.dedup_page([DuplicateGroup(1, str(odd), ())], page, title="<i>mine</i>")
    text = page.read_text("utf-8")
    assert "<b>&" not in text and "<i>mine" not in text
    assert "a &lt;b&gt;&amp;&quot;x&#x27;.png" in text and "&lt;i&gt;mine" in text
    # In the browser the name is plain text again: the alt text is the file name itself.
    (img,) = render(page, tmp_path)["images"]
    assert img["alt"] == odd.name and img["width"] > 0


def test_unreadable_images_become_placeholders_with_the_reason(tmp_path, pictures):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a JPEG")
    gone = tmp_path / "deleted.png"
    hits = [Hit(0, pictures[0], 0.9), Hit(1, str(junk), 0.8), Hit(2, str(gone), 0.7)]
    page = tmp_path / "search.html"
    assert report.search_page([("id:99", hits)], page) == 3
    text = page.read_text("utf-8")
    assert "not an image, or a format Pillow cannot read" in text
    assert "file disappeared before it could be read" in text
    assert_all_rendered(render(page, tmp_path), images=1, missing=2)


def test_hostile_files_become_placeholders_never_a_crash(tmp_path):
    from test_hostile import CASES

    folder = tmp_path / "hostile"
    folder.mkdir()
    paths, bad = [], 0
    for case in CASES:
        name, expected = case(folder)
        paths.append(os.path.join(folder, name))
        bad += expected is not None
    page = tmp_path / "hostile.html"
    hits = [Hit(i, p, 0.5) for i, p in enumerate(paths)]
    assert report.search_page([("hostile files", hits)], page) == len(paths)
    text = page.read_text("utf-8")
    assert text.count("<span class=missing") == bad
    for reason in ("empty file", "above the limit of", "not a regular file", "link"):
        assert reason in text
    # A name that is not UTF-8 is shown with its bytes escaped, not replaced by "?"...
    assert "caf\\xe9.png" in text and "caf?.png" not in text
    assert '/caf%E9.png"' in text  # ... and its link names the file byte for byte,
    assert '/caf%5Cxe9.png"' in text  # apart from the file whose name spells that escape
    assert_all_rendered(render(page, tmp_path), images=len(paths) - bad, missing=bad)


def test_each_image_is_made_once_per_page(tmp_path, pictures, monkeypatch):
    calls = []
    real = report.make_thumbnail
    monkeypatch.setattr(report, "make_thumbnail", lambda p: calls.append(p) or real(p))
    hits = [Hit(i, p, 0.5) for i, p in enumerate(pictures[:3])]
    page = tmp_path / "search.html"
    # pictures[0] is a query, a hit of both queries, and (as id:0) the second query's image.
    assert report.search_page([(pictures[0], hits), ("id:0", hits)], page) == 8
    assert sorted(calls) == sorted(pictures[:3])
    sources = re.findall(r'<img src="([^"]*)"', page.read_text("utf-8"))
    assert len(sources) == 8 and len(set(sources)) == 3


def test_thumbnails_are_kept_only_while_the_page_needs_them_again(pictures):
    thumbs = report._Thumbnails([pictures[0], pictures[1], pictures[0]])
    first = thumbs.get(pictures[0])
    assert thumbs.held() == {pictures[0]}
    thumbs.get(pictures[1])
    assert thumbs.held() == {pictures[0]}  # single-use thumbnails are never held
    assert thumbs.get(pictures[0]) is first
    assert thumbs.held() == set()


def test_a_huge_report_is_cut_with_a_note(tmp_path, pictures, monkeypatch):
    monkeypatch.setattr("simsearch.config.MAX_PAGE_FIGURES", 5)
    groups = [
        DuplicateGroup(i, pictures[i], (Duplicate(i + 3, pictures[i + 3], 0.97),)) for i in range(3)
    ] + [DuplicateGroup(9, pictures[0], (Duplicate(8, pictures[1], 0.97),))]
    page = tmp_path / "dedup.html"
    assert report.dedup_page(groups, page, threshold=0.9, complete="dedup's JSON") == 5
    text = page.read_text("utf-8")
    assert "shows the first 5 of 8 images (3 of 4 groups)" in text
    assert "use dedup&#x27;s JSON for all of them" in text
    assert text.count("<section>") == 3 and "and 1 more" in text
    assert len(thumbnails(page)) == 5


def test_resolution_is_upright_for_rotated_photos(tmp_path):
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed turned by 90 degrees
    draw_image(2, (300, 200)).save(path, exif=exif)
    thumb = report.make_thumbnail(path)
    facts = header_facts(path)  # what dedup's keep rule compares and the page shows
    assert (facts.width, facts.height) == (200, 300)
    assert (thumb.width, thumb.height) == (171, 256)  # upright too, longest side 256


def test_pages_are_replaced_atomically(tmp_path, pictures, monkeypatch):
    page = tmp_path / "out" / "report.html"
    page.parent.mkdir()
    page.write_text("old report")

    def fail(path):
        raise RuntimeError("killed while making thumbnails")

    monkeypatch.setattr(report, "make_thumbnail", fail)
    with pytest.raises(RuntimeError):
        report.search_page([(pictures[0], [])], page)
    assert page.read_text() == "old report"
    assert [p.name for p in page.parent.iterdir()] == ["report.html"]
    monkeypatch.undo()
    report.search_page([(pictures[0], [])], page)
    assert page.read_text("utf-8").startswith("<!DOCTYPE html>")
    assert "No results." in page.read_text("utf-8")
    assert [p.name for p in page.parent.iterdir()] == ["report.html"]


def test_an_unwritable_report_is_a_clear_error(tmp_path, pictures):
    with pytest.raises(ReportError, match=r"cannot write the report .*missing.*: No such file"):
        report.search_page([(pictures[0], [])], tmp_path / "missing" / "r.html")


def test_search_html_from_the_command_line(run, tmp_path, index_path, photo_dir):
    page = tmp_path / "similar.html"
    query = photo_dir / "img2.jpg"
    result = run("search", query, "id:1", "--index", index_path, "-k", "3", "--html", page)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"query: {query}\n")  # the table is still printed
    assert f"wrote {page} (8 images)" in result.stderr
    lines = run("search", "id:1", "--index", index_path, "-k", "3", "--json").stdout
    (itself,) = [h["path"] for h in json.loads(lines)["hits"] if h["id"] == 1]
    second = page.read_text("utf-8").split("<section>")[2]
    assert re.search(f'<figure class="query"><a [^>]*title="{re.escape(itself)}"', second)
    assert_all_rendered(render(page, tmp_path), 8)


def test_dedup_html_from_the_command_line(run, tmp_path, index_path, photo_dir):
    shutil.copy(photo_dir / "img3.png", photo_dir / "img3-copy.png")
    assert run("-q", "index", photo_dir, "--index", index_path).exit_code == 0
    page = tmp_path / "duplicates.html"
    result = run("dedup", "--threshold", "0.999", "--index", index_path, "--html", page)
    assert result.exit_code == 0, result.output
    assert "1 groups, 1 duplicates" in result.stdout
    assert f"wrote {page} (2 images)" in result.stderr
    text = page.read_text("utf-8")
    assert text.count('<figure class="keep">') == 1 and "img3-copy.png" in text
    quiet = run("-q", "dedup", "--threshold", "0.999", "--index", index_path, "--html", page)
    assert quiet.stderr == ""
    assert_all_rendered(render(page, tmp_path), 2)


def test_an_unwritable_html_path_is_a_one_line_error(run, tmp_path, index_path, photo_dir):
    page = tmp_path / "no" / "such" / "folder.html"
    result = run("search", photo_dir / "img0.jpg", "--index", index_path, "--html", page)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot write the report {page}: No such file or directory"
    ]


def test_cluster_html_from_the_command_line(run, tmp_path, index_path):
    page = tmp_path / "clusters.html"
    result = run("cluster", "-k", "2", "--top", "3", "--index", index_path, "--html", page)
    assert result.exit_code == 0, result.output
    sizes = [int(n) for n in re.findall(r"cluster \d+: (\d+) images", result.stdout)]
    assert sum(sizes) == 8 and len(sizes) == 2
    shown = sum(min(3, n) for n in sizes)
    assert f"wrote {page} ({shown} images)" in result.stderr
    text = page.read_text("utf-8")
    assert text.count("<h2>Cluster ") == 2
    again = run("cluster", "--show", "--top", "1", "--index", index_path, "--html", page)
    assert again.exit_code == 0 and f"wrote {page} (2 images)" in again.stderr
    assert_all_rendered(render(page, tmp_path), 2)
