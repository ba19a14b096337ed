"""lab serve's page in a real browser: Debian's headless Chromium, driven by Playwright (its own browser
download is never used). Open the page, generate, watch the text stream in, stop it, open a run's
curves. The screenshot is kept in artifacts/ (gitignored; CI can collect it)."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from serving import Server, make_run

from lab_serve.server import build

pytestmark = pytest.mark.slow  # a real browser; tests/test_serve.py covers the API the page uses

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LAB_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser") / "runs"
    make_run(root / "tiny-a", seed=0)
    make_run(root / "tiny-b", seed=1, steps=9)
    app, pool = build([root])
    s = Server(app)
    for run in ("tiny-a", "tiny-b"):
        served = pool.get(run)
        served.batcher.eos_id = None  # every generation runs until max tokens or Stop
        # ~25 tokens/s, so a person (and the test) sees the text grow and can stop it mid-way
        served.model.register_forward_hook(lambda *a: time.sleep(0.04))
    yield s, pool
    s.stop()
    pool.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_generate_stream_stop_and_see_a_runs_curves(server, browser):
    s, pool = server
    page = browser.new_page(viewport={"width": 1100, "height": 1300})
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(s.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")

    page.select_option("#model", "tiny-b")
    page.fill("#prompt", "The tiny model says")
    page.fill("#max_tokens", "60")
    page.click("#generate")
    text = page.locator("#output-text")
    page.wait_for_function("document.getElementById('output-text').textContent.length > 0")
    first = text.text_content()
    page.wait_for_function(f"document.getElementById('output-text').textContent.length > {len(first)}")
    assert text.text_content().startswith(first)  # the text grows as tokens arrive
    page.wait_for_function("/tokens\\/s/.test(document.getElementById('stats').textContent)")
    page.click("#stop")
    page.wait_for_function("/stopped/.test(document.getElementById('stats').textContent)")
    stopped_at = text.text_content()
    tokens = int(page.text_content("#stats").split(" tokens")[0])
    assert 2 <= tokens < 60
    time.sleep(0.5)
    assert text.text_content() == stopped_at  # nothing arrives after Stop
    deadline = time.monotonic() + 10
    while pool.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.in_flight() == 0  # the server stopped generating too
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")

    page.click("#tab-runs")
    page.click("#runs-list button[data-run='tiny-b']")
    page.wait_for_selector("#chart canvas")
    page.wait_for_function("document.getElementById('recipe').textContent.includes('[model]')")
    legend = page.text_content("#chart")
    assert "train loss" in legend and "val loss" in legend
    assert "tiny model" in page.text_content("#generated")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-runs.png"), full_page=True)
    page.click("#tab-play")
    page.screenshot(path=str(ARTIFACTS / "serve-playground.png"), full_page=True)

    assert all(u.startswith(s.url) for u in asked), "the page must load nothing from the network"
    page.close()


def test_the_page_asks_for_the_api_key(tmp_path, browser):
    make_run(tmp_path / "keyed")
    app, pool = build([tmp_path], api_key="k3y")
    s = Server(app)
    try:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "k3y" not in page.content()
        page.fill("#api-key", "k3y")
        page.click("#key-form button")
        page.wait_for_function("document.querySelectorAll('#model option').length == 1")
        page.fill("#max_tokens", "3")
        page.click("#generate")
        page.wait_for_function("/length/.test(document.getElementById('stats').textContent)")
        assert page.text_content("#output-text")
        page.close()
    finally:
        s.stop()
        pool.close()
