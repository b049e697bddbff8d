"""The dashboard in a real browser: ``flatlora app`` on a free local port and Debian's headless Chromium.

Used by the browser test, and run as a script to take a screenshot of every page::

    python tests/browser.py runs/demo OUT_DIR      # OUT_DIR/dashboard-<page>.png

Needs the apt packages ``chromium`` and ``chromium-driver`` (never a downloaded browser) and
``selenium`` (the ``dev`` extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PAGES = ("", "landscapes", "curvature", "correlation", "report")  # "" is the Runs page
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def missing_browser() -> str | None:
    """Why no browser test can run here, or None."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def serve_app(runs_dir: str | Path, timeout: float = 60.0) -> Iterator[str]:
    """``flatlora app RUNS_DIR`` on a free port of 127.0.0.1; yields its address once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flatlora = shutil.which("flatlora", path=str(Path(sys.executable).parent)) or "flatlora"
    server = subprocess.Popen(
        [flatlora, "app", str(runs_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:  # flatlora app execs Streamlit: the signal reaches the server itself, nothing is orphaned
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1600):
    """A Selenium driver of /usr/bin/chromium, headless, quit on exit."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def wait_for_chart(browser, timeout: float = 120.0) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot")))


def assert_pages_render(runs_dir: str | Path, pages: list[tuple[str, str, str]], artifacts: Path) -> None:
    """Open each ``(page, text, png)`` of ``flatlora app RUNS_DIR`` in headless Chromium and check it renders.

    Each page must draw a Plotly chart, show ``text``, raise no Streamlit exception, and leave a
    screenshot ``artifacts/png`` of more than 10 kB. Skips the calling test where no browser is installed.
    """
    import pytest

    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    artifacts.mkdir(parents=True, exist_ok=True)
    with serve_app(runs_dir) as url, headless_chromium() as browser:
        for page, text, png in pages:
            browser.get(f"{url}/{page}")
            wait_for_chart(browser)
            WebDriverWait(browser, 60).until(lambda b, w=text: w in b.find_element(By.TAG_NAME, "body").text)
            time.sleep(1)
            assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), page
            assert browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg"), page
            browser.save_screenshot(str(artifacts / png))
            assert (artifacts / png).stat().st_size > 10_000, png


def screenshots(runs_dir: str = "runs/demo", out_dir: str = "screens") -> None:
    """A PNG of every page (the README's docs/dashboard.png is the Landscapes page)."""
    from selenium.common.exceptions import TimeoutException

    reason = missing_browser()
    if reason:
        raise SystemExit(reason)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with serve_app(runs_dir) as url, headless_chromium(1500, 1700) as browser:
        for page in PAGES:
            browser.get(f"{url}/{page}")
            try:
                wait_for_chart(browser, 60 if page == "report" else 180)
            except TimeoutException:
                if page != "report":  # the Report page has no chart
                    raise
            time.sleep(4)  # let the remaining charts draw
            path = out / f"dashboard-{page or 'runs'}.png"
            browser.save_screenshot(str(path))
            print(path)


if __name__ == "__main__":
    screenshots(*sys.argv[1:])
