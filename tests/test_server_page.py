"""The web page of `simsearch serve`, driven in a real browser: a real server (uvicorn, in a
thread) over a small index, headless Chromium through Selenium. Upload a photo and find its
original first; click a result to search by it; review a duplicate group, move it aside
(dry run, then confirm) and undo the move, watching the files on disk; run the index; see
an API error in the banner. Screenshots of each step go to a folder under tmp_path, their
paths printed (pytest -s or -rA shows them).

Skipped where Chromium, chromedriver, Selenium or the server extra is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import draw_image
from test_report import BROWSERS

pytestmark = pytest.mark.e2e

TOKEN = "page-test-token"
THRESHOLD = "0.995"  # the image and its resized copy score ~1.0; distinct drawings < 0.99
XSS_NAME = "<img src=x onerror=window.pwned=1>.png"  # a path is user data, shown as text
# Long enough for a machine busy with other work (each wait ends as soon as it is met):
# the full suite once ran this beside a load benchmark and the index run took over 15 s.
WAIT_S = 60
TIMES = "\N{MULTIPLICATION SIGN}"  # as the page writes pixel sizes


@pytest.fixture
def chrome() -> tuple[str, str]:
    """The browser and its driver, or skip (as test_report does for the browser): asked
    for first, so that a machine without them skips before any index is built."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium); browser test skipped")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if driver is None:
        pytest.skip("no chromedriver installed (apt-get install chromium-driver); skipped")
    pytest.importorskip("selenium")
    return browser, driver


@pytest.fixture
def collection(tmp_path, tiny_vit) -> dict:
    """Photos (six drawings, a resized copy of one, one with HTML in its name, a broken
    file), indexed with tiny_vit and clustered in two."""
    from simsearch import Index

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        draw_image(i, (160, 120)).save(photos / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    draw_image(0, (160, 120)).resize((120, 90)).save(photos / "img0-small.jpg", quality=85)
    draw_image(6, (160, 120)).save(photos / XSS_NAME)
    (photos / "broken.jpg").write_bytes(b"this is not a JPEG")
    index = tmp_path / "index"
    with Index.create(index, model=tiny_vit) as idx:
        idx.add(photos)
        groups = idx.duplicates(float(THRESHOLD))
        idx.cluster(2)
    found = [(Path(g.keep_path).name, [Path(d.path).name for d in g.duplicates]) for g in groups]
    assert found == [("img0.jpg", ["img0-small.jpg"])]
    return {"photos": photos, "index": index, "keep_id": groups[0].keep_id}


@contextmanager
def _serving(settings):
    """`simsearch serve` with `settings`, uvicorn in a thread; yields its base URL."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from simsearch.server.app import create_app

    with socket.socket() as probe:  # a free port (port 0 would do, but the URL is needed)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def served(tmp_path, collection):
    """`simsearch serve --move-to MOVED --token TOKEN`: its URL, folders and the kept id."""
    from simsearch.server.state import Settings

    moved = tmp_path / "moved"
    settings = Settings(index=collection["index"], move_to=moved, token=TOKEN, window=0.0)
    with _serving(settings) as url:
        yield {"url": url, "moved": moved, **collection}


@pytest.fixture
def browser(chrome, tmp_path):
    """Headless Chromium through Selenium, its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chrome
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path / "chromium-profile"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page under test: waiting, finding, and screenshots of each step."""

    def __init__(self, driver, folder: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.by = By
        self.wait = WebDriverWait(driver, WAIT_S)
        self.folder = folder
        self.shots: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def until(self, check, what: str):
        """Wait until `check(page)` is truthy; its value."""

        def probe(_):
            try:
                return check(self)
            except Exception:  # not there yet (stale, missing): look again
                return False

        return self.wait.until(probe, f"waited {WAIT_S} s for {what}")

    def visible(self, css: str):
        return self.until(lambda p: p.find(css).is_displayed() and p.find(css), css)

    def images_loaded(self, css: str = "main img") -> None:
        script = (
            "return [...document.querySelectorAll(arguments[0])].filter(i => i.offsetParent)"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        self.until(lambda p: p.driver.execute_script(script, css), f"the images of {css}")

    def shot(self, name: str) -> Path:
        path = self.folder / f"{len(self.shots) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        print(f"screenshot: {path}")
        return path


def test_page_searches_reviews_duplicates_moves_and_undoes(chrome, served, browser, tmp_path):
    photos, moved = served["photos"], served["moved"]
    page = Page(browser, tmp_path / "screenshots")
    print(f"screenshots folder: {page.folder}")
    try:
        _walk_through(page, served, photos, moved)
    except BaseException:
        page.shot("failure")
        raise
    finally:
        console = browser.get_log("browser")  # read once: reading empties it
        print("browser console:")
        for entry in console:
            print(f"  {entry['level']}: {entry['message']}")
        print("screenshots:\n" + "\n".join(f"  {p}" for p in page.shots))
    # No script error and nothing blocked (the page keeps to its own CSP); the API's
    # error answers (400 asking for a threshold, 404 for id 99999) are the only failures.
    errors = [
        e["message"] for e in console
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]  # fmt: skip
    assert not errors, errors
    failed = [e["message"] for e in console if "Failed to load resource" in e["message"]]
    assert len(failed) == 2 and "400" in failed[0] and "404" in failed[1], failed


def _walk_through(page: Page, served: dict, photos: Path, moved: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = page.driver
    # The token in the address: the server sets its cookie, and every fetch carries it.
    driver.get(f"{served['url']}/?token={TOKEN}")
    page.until(lambda p: "8 images" in p.find("#info").text, "the index info in the header")
    assert "1 failed" in page.find("#info").text

    # The index run, followed by server-sent events (first: its event stream is long
    # closed by the time the server stops).
    page.find("nav a[data-view=index]").click()
    page.visible("#index-start").click()
    page.until(lambda p: "seen" in p.find("#index-summary").text, "the run's summary")
    assert not page.find("#index-start").get_attribute("disabled")
    assert page.find("#index-roots").text.strip() == str(photos)
    page.shot("index-run")

    # Upload a photo: its original is the first result.
    page.find("nav a[data-view=search]").click()
    query = photos / "img3.png"
    page.visible("#file").send_keys(str(query))
    first = page.until(lambda p: p.find("#results .result .card"), "the upload's results")
    result = page.find("#results .result")
    assert result.get_attribute("data-query") == "image:img3.png"
    assert first.get_attribute("data-path") == str(query)
    assert first.find_element(page.by.CSS_SELECTOR, ".score").text == "1.0000"
    cards = page.all("#results .result .card")
    assert len(cards) == 8  # k=20: every indexed image, the broken file not among them
    names = [c.find_element(page.by.CSS_SELECTOR, "a.name").text for c in cards]
    assert XSS_NAME in names  # shown as text, never run as HTML
    assert driver.execute_script("return window.pwned") is None
    page.images_loaded("#results img")
    page.shot("upload-results")

    # Click a result (the second): a search by its id, its own hit first.
    second = cards[1]
    chosen = second.get_attribute("data-id")
    second.find_element(page.by.CSS_SELECTOR, "button.thumb").click()
    page.until(
        lambda p: p.find("#results .result").get_attribute("data-query") == f"id:{chosen}",
        "the search by the clicked result",
    )
    assert page.find("#results .result .card").get_attribute("data-id") == chosen
    assert f"id={chosen}" in driver.current_url
    page.images_loaded("#results img")
    page.shot("search-by-result")

    # "/" jumps to the id box; Enter searches.
    page.find("body").send_keys("/")
    assert driver.switch_to.active_element.get_attribute("id") == "qid"
    driver.switch_to.active_element.send_keys(str(served["keep_id"]), Keys.ENTER)
    typed = f"id:{served['keep_id']}"
    page.until(
        lambda p: p.find("#results .result").get_attribute("data-query") == typed,
        "the search typed into the id box",
    )

    # Clusters: the list, then one cluster's images.
    page.find("nav a[data-view=clusters]").click()
    page.visible("#cluster-list .cluster a.button").click()
    page.until(lambda p: p.all("#members-grid .card"), "the members of cluster 1")
    page.images_loaded("#view-clusters img")
    page.shot("clusters")

    # Duplicates: no calibrated threshold, so the page asks for one.
    page.find("nav a[data-view=duplicates]").click()
    page.visible("#calibrate-note")
    assert page.find("#banner").is_displayed() is False
    box = page.find("#threshold")
    box.clear()
    box.send_keys(THRESHOLD, Keys.ENTER)
    group = page.until(lambda p: p.find("#groups .group"), "the duplicate group")
    assert group.get_attribute("data-keep") == str(served["keep_id"])
    keep = group.find_element(page.by.CSS_SELECTOR, ".member.keep")
    dup = group.find_element(page.by.CSS_SELECTOR, ".member.dup")
    assert keep.get_attribute("data-path") == str(photos / "img0.jpg")
    assert dup.get_attribute("data-path") == str(photos / "img0-small.jpg")
    assert "keep" in keep.text and f"160{TIMES}120 JPEG lossy" in keep.text
    assert f"120{TIMES}90 JPEG lossy" in dup.text and "resolution" in dup.text  # why
    page.images_loaded("#groups img")
    page.shot("duplicates")

    # Move it aside: a dry run first, nothing moves; then confirm.
    group.find_element(page.by.CSS_SELECTOR, "button.move-group").click()
    confirm = page.visible("#move-confirm")
    assert str(photos / "img0-small.jpg") in page.find("#move-panel").text
    assert (photos / "img0-small.jpg").exists()
    page.shot("move-dry-run")
    confirm.click()
    page.until(lambda p: p.find("#move-panel h3").text.startswith("Moved 1 file"), "the move")
    assert not (photos / "img0-small.jpg").exists()
    assert [p.name for p in moved.rglob("img0-small.jpg")] == ["img0-small.jpg"]
    page.until(lambda p: "No duplicates" in p.find("#dup-summary").text, "the groups reloaded")
    page.until(lambda p: p.find("#moves tr[data-manifest]"), "the move in Past moves")
    page.until(lambda p: "7 images" in p.find("#info").text, "the header's new count")
    page.shot("moved")

    # Undo it (confirmed): the file is back, out of the move folder.
    page.find("#moves tr[data-manifest] button.undo").click()
    page.visible("#undo-confirm").click()
    page.until(lambda p: p.find("#move-panel h3").text == "Put back 1 file", "the undo")
    assert (photos / "img0-small.jpg").exists()
    assert not list(moved.rglob("img0-small.jpg"))
    page.until(lambda p: p.find("#groups .group"), "the group back")
    page.until(lambda p: "8 images" in p.find("#info").text, "the header's count back")
    page.shot("undone")

    # Failed files.
    page.find("nav a[data-view=failed]").click()
    page.until(lambda p: "broken.jpg" in p.find("#failed-table").text, "the failed file")
    page.shot("failed")

    # An API error: shown in the banner, dismissed with its button.
    driver.get(f"{served['url']}/#search?id=99999")
    banner = page.visible("#banner")
    assert "no indexed image has id 99999" in banner.text
    page.shot("error-banner")
    page.find("#banner-close").click()
    page.until(lambda p: not p.find("#banner").is_displayed(), "the banner dismissed")

    # A phone, in the dark.
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    driver.set_window_size(390, 844)
    page.find("#qid").clear()
    page.find("#qid").send_keys("1", Keys.ENTER)
    page.until(lambda p: p.find("#results .result").get_attribute("data-query") == "id:1", "id:1")
    page.images_loaded("#results img")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= driver.execute_script("return window.innerWidth")  # no sideways scroll
    page.shot("phone-dark")


def test_page_says_when_moving_is_off(chrome, collection, browser, tmp_path):
    """A server without --move-to (and without a token): the dry run is refused, and the
    page says why instead of showing an error."""
    from simsearch.server.state import Settings

    page = Page(browser, tmp_path / "screenshots")
    with _serving(Settings(index=collection["index"], window=0.0)) as url:
        browser.get(f"{url}/#duplicates?threshold={THRESHOLD}")
        group = page.until(lambda p: p.find("#groups .group"), "the duplicate group")
        group.find_element(page.by.CSS_SELECTOR, "button.move-group").click()
        page.until(lambda p: "Moving duplicates is off" in p.find("#move-panel").text, "the note")
        assert not page.find("#banner").is_displayed()
        assert page.find("#move-page").get_attribute("disabled") is not None
        assert (collection["photos"] / "img0-small.jpg").exists()
        page.shot("moving-off")


def test_page_calibrates_an_index_that_has_no_threshold(chrome, collection, browser, tmp_path):
    """An uncalibrated index: the duplicates view offers calibration, and after it lists the
    groups at the threshold it found, which the index keeps."""
    from simsearch import Index
    from simsearch.server.state import Settings

    page = Page(browser, tmp_path / "screenshots")
    with _serving(Settings(index=collection["index"], window=0.0)) as url:
        browser.get(f"{url}/#duplicates")
        page.until(lambda p: p.find("#calibrate-note").is_displayed(), "the calibration note")
        page.find("#calibrate").click()
        page.until(lambda p: "at threshold" in p.find("#dup-summary").text, "the groups")
        page.shot("calibrated")
    with Index.open(collection["index"]) as idx:
        kept = idx.manifest.dedup_calibration
    assert kept is not None
    assert f"threshold {kept['threshold']}" in page.find("#dup-summary").text


def test_a_run_that_ends_before_its_start_is_answered_shows_as_ended(
    chrome, collection, browser, tmp_path, monkeypatch
):
    """The answer to "start a run" carries the state when the run started; a short run can
    end, and its last event reach the page, before that answer does. The page must not let
    the older answer paint the run as still going (the button disabled, no summary), since
    no later event would correct it: the answer is held here until the run has ended."""
    from simsearch.server import collection as routes
    from simsearch.server.state import Settings

    status = routes._status

    def answered_late(request):
        state = status(request)
        if request.method == "POST":
            server = routes._server(request)
            server.job.join(WAIT_S)  # the run ends, and its events go out, first
            time.sleep(1.0)
        return state

    monkeypatch.setattr(routes, "_status", answered_late)
    settings = Settings(index=collection["index"], token=TOKEN, window=0.0)
    with _serving(settings) as url:
        page = Page(browser, tmp_path / "screenshots")
        browser.get(f"{url}/?token={TOKEN}")
        page.until(lambda p: "8 images" in p.find("#info").text, "the index info")
        page.find("nav a[data-view=index]").click()
        page.visible("#index-start").click()
        page.until(lambda p: "seen" in p.find("#index-summary").text, "the run's summary")
        time.sleep(2.0)  # the late answer has come by now
        assert "seen" in page.find("#index-summary").text
        assert not page.find("#index-start").get_attribute("disabled")
        assert "finished" in page.find("#index-state").text
