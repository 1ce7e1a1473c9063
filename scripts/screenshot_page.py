"""Make docs/serve-page.png: the search page of `imgsearch serve` after a
query, in headless Chromium (Debian's chromium and chromium-driver, driven
by Selenium).

Usage:
    python scripts/screenshot_page.py [--out docs/serve-page.png]

Indexes a temporary copy of sample_data/labelled with efficientnet-lite0
(offline), serves it, uploads sample_data/queries/tench.jpg and waits for
the neighbours' thumbnails and the kNN vote before taking the picture.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve-page.png")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    # A neutral temporary folder: the page shows the indexed paths.
    work = Path(tempfile.mkdtemp(prefix="photos-"))
    server = None
    try:
        shutil.copytree(REPO / "sample_data" / "labelled", work / "photos")
        subprocess.run([sys.executable, "-m", "imgsearch", "index", str(work / "photos"), "--index",
                        str(work / "index"), "--encoder", "efficientnet-lite0"], check=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "imgsearch", "serve", "--index", str(work / "index"),
                                   "--port", str(port)])
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                         "--hide-scrollbars"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            for _ in range(600):  # until the server answers
                try:
                    driver.get(f"http://127.0.0.1:{port}/")
                    break
                except Exception:
                    time.sleep(0.2)
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: "50 images" in d.find_element("id", "summary").text)
            driver.find_element("id", "file").send_keys(str(REPO / "sample_data" / "queries" / "tench.jpg"))
            wait.until(lambda d: d.execute_script(
                "const imgs = [...document.querySelectorAll('#results img')];"
                "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) &&"
                " !document.getElementById('classification').hidden"))
            driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
        print(f"wrote {args.out}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
