"""The live status page (``/ui``) in headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``) while real requests run on the SmolLM2 server: it shows
the model, a running request with its progress, and a non-empty throughput chart."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
if CHROMIUM is None:
    pytest.skip("no chromium on PATH: scripts/install_chromium.sh installs it (root + apt)", allow_module_level=True)

PAGE_TIMEOUT_MS = 60_000


def keep_busy(url: str, stop: threading.Event, errors: list[BaseException]) -> None:
    """Streams completions back to back until ``stop``: there is always one running."""
    body = {"model": "claude-haiku-4-5", "prompt": "Once upon a time, in a small village,", "max_tokens": 300,
            "temperature": 0.8, "stream": True}
    try:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                with client.stream("POST", f"{url}/v1/completions", json=body) as res:
                    res.raise_for_status()
                    for _ in res.iter_lines():
                        if stop.is_set():
                            break
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_status_page_shows_model_running_request_and_chart(tmp_path: Path):
    with pensieve_server() as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["display_name"]
        stop, errors = threading.Event(), []
        worker = threading.Thread(target=keep_busy, args=(url, stop, errors), daemon=True)
        worker.start()
        try:
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(url)  # a browser asking for / is sent to the page
                page.wait_for_selector("#running tr.request", timeout=PAGE_TIMEOUT_MS)
                page.wait_for_function("Number(document.getElementById('chart').dataset.total) > 0",
                                       timeout=PAGE_TIMEOUT_MS)
                shot = Path(os.environ.get("PENSIEVE_TEST_LOG_DIR", tmp_path)) / "status_page.png"
                page.screenshot(path=str(shot), full_page=True)
                models = page.inner_text("#models")
                row = page.locator("#running tr.request").first
                cells = row.locator("td").all_inner_texts()
                line = page.get_attribute("#chart-line", "d")
                hit_rate = page.inner_text("#hit-rate")
                final_url = page.url
                browser.close()
        finally:
            stop.set()
            worker.join(timeout=60)
    assert not errors, errors
    assert model in models and "loaded" in models
    assert cells[0].startswith("req_") and cells[1] == model and cells[2] == "completions"
    assert int(cells[3]) > 5  # prompt tokens
    assert line and line.count("L") > 10  # a polyline over the window's buckets
    assert hit_rate.endswith("%")
    assert shot.stat().st_size > 10_000
    assert final_url.endswith("/ui")
