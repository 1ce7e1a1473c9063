"""The search page of `imgsearch serve` in a real browser: headless Chromium
(Debian's `chromium` and `chromium-driver` packages, never a download)
driven by Selenium, against the real server and a real index.

Upload an image and see the library's neighbours, click through "more like
this", use it from the keyboard, drop an image, see the kNN label with its
votes, browse by label, and load nothing from elsewhere.  Where Chromium is
not installed the test skips with the reason, except under CI (set by
.ci/run), where it must run.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import PLUGINS_DIR, SAMPLE_DATA
from test_serve import HAVE_STACK
from test_web import serving, wait_ready

QUERY = SAMPLE_DATA / "queries" / "tench.jpg"
K = 12  # the page's default number of neighbours


def _browser_or_reason():
    """(chromium, chromedriver) paths, or why the test cannot run."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        return None, "no Chromium here (Debian: apt-get install chromium chromium-driver)"
    return (chromium, driver), None


@pytest.fixture
def browser():
    found, reason = _browser_or_reason()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _until(driver, condition, what, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition(), message=what)


def _shown(driver, list_id, field="id"):
    """One field of every item of a list on the page, read in one step (the
    page replaces the items as results come in)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(li => li.dataset[arguments[1]])",
        f"#{list_id} > li", field)


def _shown_ids(driver, list_id):
    return [int(value) for value in _shown(driver, list_id)]


@pytest.mark.skipif(not HAVE_STACK, reason="FastAPI and uvicorn are not installed")
def test_the_page_in_a_real_browser(browser, index_dir):
    from selenium.webdriver.common.keys import Keys

    from imgsearch import Index

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        expected = index.query([QUERY], k=K)[0]
        more_than_voters = index.query([QUERY], k=25)[0]
        verdict = index.classify([QUERY], k=20)[0]
        first = expected.hits[0].entry
        from_first = index.query([first.path], k=K)[0]  # itself left out, like the page
        second = from_first.hits[0].entry
        from_second = index.query([second.path], k=K)[0]

    with serving(index_dir) as running:
        wait_ready(running.port)
        base = f"http://127.0.0.1:{running.port}"
        driver = browser
        driver.get(base + "/")
        _until(driver, lambda: "50 images" in driver.find_element("id", "summary").text, "the index summary")
        _until(driver, lambda: len(_shown_ids(driver, "listing")) == 50, "the listing of the index")

        # Upload: the library's neighbours, in its order, with their scores.
        driver.find_element("id", "file").send_keys(str(QUERY))
        _until(driver, lambda: _shown_ids(driver, "results") == [h.entry.id for h in expected.hits],
               "the neighbours of the uploaded image")
        scores = [float(value) for value in _shown(driver, "results", "score")]
        assert scores == pytest.approx([h.score for h in expected.hits], abs=1e-5)
        first_card = driver.find_element("css selector", "#results > li")
        assert first.path in first_card.text and (first.label or "") in first_card.text
        # The kNN label and its vote breakdown.
        _until(driver, lambda: driver.find_element("id", "predicted").text == verdict.label, "the kNN label")
        assert _shown(driver, "votes", "label") == list(verdict.votes)
        # The thumbnails really are images that the browser could decode.
        _until(driver, lambda: driver.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"),
            "the thumbnails")

        # "More like this" by clicking the first result.
        first_card.find_element("css selector", "button").click()
        _until(driver, lambda: driver.find_element("id", "query-name").text == first.path, "the clicked query")
        _until(driver, lambda: _shown_ids(driver, "results") == [h.entry.id for h in from_first.hits],
               "the neighbours of the clicked image")

        # The keyboard: after a search the first result has the focus, and
        # Enter on it is "more like this" again.
        _until(driver, lambda: driver.switch_to.active_element.get_attribute("data-id") == str(second.id),
               "the focus on the first result")
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        _until(driver, lambda: _shown_ids(driver, "results") == [h.entry.id for h in from_second.hits],
               "the neighbours after Enter")

        # Drop an image file onto the drop zone, and paste one.
        for how, name in (("drop", "dropped.jpg"), ("paste", "pasted.jpg")):
            driver.execute_async_script("""
                const [url, how, name, done] = arguments;
                fetch(url).then(r => r.blob()).then(blob => {
                  const transfer = new DataTransfer();
                  transfer.items.add(new File([blob], name, {type: "image/jpeg"}));
                  const event = how === "drop"
                    ? new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true})
                    : new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true});
                  (how === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
                  done();
                });""", f"/api/images/{first.id}/thumbnail", how, name)
            _until(driver, lambda: driver.find_element("id", "query-name").text == name, f"the {how} image")
            _until(driver, lambda: _shown_ids(driver, "results")[:1] == [first.id], f"the {how} image's neighbours")

        # More neighbours than vote (20): the page asks for them apart.
        field = driver.find_element("id", "k")
        field.clear()
        field.send_keys("25")
        driver.find_element("id", "file").send_keys(str(QUERY))
        _until(driver, lambda: _shown_ids(driver, "results") == [h.entry.id for h in more_than_voters.hits],
               "25 neighbours")
        assert driver.find_element("id", "predicted").text == verdict.label

        # Browse by label.
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("id", "label")).select_by_value("tench")
        _until(driver, lambda: len(_shown_ids(driver, "listing")) == 10, "the tench images")
        assert set(_shown(driver, "listing", "label")) == {"tench"}

        # Nothing was loaded from elsewhere, and the page logged no error.
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(url.startswith(base + "/") for url in resources), resources
        errors = [entry for entry in driver.get_log("browser")
                  if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]
        assert errors == []
    running.index.close()
