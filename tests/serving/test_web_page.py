"""The web page in headless Chromium: choose an image, see the overlay, the score against the threshold, the verdict."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aeflow.serving.runtime import LoadedRun
from aeflow.serving.server import background_server, create_app

from .conftest import phantoms

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed at /usr/bin/chromium (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the python playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_upload_shows_overlay_score_bar_and_verdict(run_dir, browser, tmp_path):
    loaded = LoadedRun(run_dir)
    image = tmp_path / "scan.png"
    Image.fromarray((phantoms(1, seed=7)[0, 0].numpy() * 65535).astype(np.uint16)).save(image)
    expected = loaded.score_samples([loaded.dataset([str(image)])[0]])[0]

    with background_server(create_app(run_dir, run=loaded)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('aeflow')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result.shown", timeout=30_000)
        verdict = page.inner_text("#verdict")
        assert verdict == ("Anomalous" if expected.pred_label else "Normal")
        assert page.get_attribute("#verdict", "data-label") == str(expected.pred_label)
        assert float(page.inner_text("#score")) == pytest.approx(expected.pred_score, rel=1e-3)
        assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") >= 64
        # the score marker sits on the side of the threshold marker that the verdict says
        marker = float(page.evaluate("parseFloat(document.getElementById('marker').style.left)"))
        cut = float(page.evaluate("parseFloat(document.getElementById('cut').style.left)"))
        assert (marker > cut) == bool(expected.pred_label)

        page.set_input_files("#file", {"name": "fake.png", "mimeType": "image/png", "buffer": b"not an image" * 20})
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error").startswith("415")
        page.close()
