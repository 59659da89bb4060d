"""What the browser tests share: the app served by `streamlit run` on a test's workspace, a headless Chromium tab
that records every request leaving the machine, and the steps a user takes (go to a page, wait for it, shoot it).

A test that wants a trained run asks for `workspace` (conftest.py) before `page`: the app then serves that
registry. Skipped when /usr/bin/chromium is absent (.ci/run installs it).
"""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from core.workspace import DEMO_DIR, REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
DEMO = DEMO_DIR / "hazelnut_toy"

# Every browser test module sets `pytestmark = browser_kit.BROWSER`.
BROWSER = [pytest.mark.browser,
           pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    port = free_port()
    env = {**os.environ, "ANOMALYSCOPE_HOME": str(tmp_path / "workspace")}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                pytest.fail("the app did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def page(app_url, request):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        tab = browser.new_page(viewport={"width": 1440, "height": 1800})
        tab.set_default_timeout(60_000)
        tab.outside = []   # every request to another host than the app's: there must be none
        tab.on("request", lambda request: tab.outside.append(request.url) if urlparse(request.url).scheme in (
            "http", "https", "ws", "wss") and urlparse(request.url).hostname not in ("127.0.0.1", "localhost") else None)
        tab.goto(app_url)
        yield tab
        shot(tab, f"last_{request.node.name}")   # where the test ended: on a failure, what was on screen
        browser.close()


def demo_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in sorted(DEMO.rglob("*")):
            if p.is_file() and p.suffix != ".md":
                zf.write(p, "hazelnut_toy/" + p.relative_to(DEMO).as_posix())
    return buffer.getvalue()


def settle(page) -> None:
    """Wait until the script run is over and the page is drawn."""
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=120_000)
    page.wait_for_timeout(300)


def go(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()
    settle(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def metric(page, label: str) -> str:
    exact = page.get_by_test_id("stMetricLabel").get_by_text(label, exact=True)
    box = page.get_by_test_id("stMetric").filter(has=exact).first
    return box.get_by_test_id("stMetricValue").inner_text()


def selectbox(page, label: str):
    return page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True)).first


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`."""
    selectbox(page, label).click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def chosen(page, label: str) -> str:
    """The option the selectbox labelled `label` shows."""
    return selectbox(page, label).locator("input").first.input_value()
