"""The web page in headless Chromium: choose an image, see it beside its heat map with a colour bar, the score on an
axis fixed for the run against the threshold, the verdict; an error clears the previous result."""

from __future__ import annotations

import base64
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aeflow.evaluation.assess import SCORES_FILE, write_scores
from aeflow.evaluation.thresholds import Threshold
from aeflow.inference import Predictions
from aeflow.serving.runtime import LoadedRun
from aeflow.serving.server import background_server, create_app, score_axis

from .conftest import IMAGE_SIZE, phantoms

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
        page.locator("#model", has_text="aeflow").wait_for()  # no wait_for_function: the CSP forbids eval
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


# --- the fixed score axis, the plain image, the colour bar, errors that clear the result ---------------------------


@pytest.fixture(scope="module")
def tested_run(run_dir, tmp_path_factory):
    """The tiny run after `aeflow test`: a copy with scores.csv holding 24 validation scores (12 normal, 12 with a
    lesion), written by the same function `aeflow test` uses."""
    folder = tmp_path_factory.mktemp("tested") / "tiny"
    shutil.copytree(run_dir, folder)
    loaded = LoadedRun(folder)
    images = torch.cat([phantoms(12, seed=2), phantoms(12, seed=3, anomaly="bright_lesion")])
    scores = np.array([s.pred_score for s in loaded.score(images)])
    labels = np.repeat([0, 1], 12)
    val = Predictions(scores, labels, [f"val{i}" for i in range(24)], ["good"] * 12 + ["bright_lesion"] * 12)
    test = Predictions(scores[:2] + 100.0, labels[:2], ["t0", "t1"], ["good", "good"])  # far off: must be ignored
    write_scores(folder / SCORES_FILE, {"val": val, "test": test})
    return folder, loaded, scores


def expected_axis(scores: np.ndarray, threshold: float) -> tuple[float, float]:
    low, high = np.percentile(scores, (1.0, 99.0))
    low, high = min(low, threshold), max(high, threshold)
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def test_score_axis_comes_from_the_validation_scores(tested_run, run_dir, tmp_path):
    folder, loaded, scores = tested_run
    axis = score_axis(folder, loaded.threshold)
    assert (axis["low"], axis["high"]) == pytest.approx(expected_axis(scores, loaded.threshold.value))
    assert axis["n_validation"] == 24 and "validation scores" in axis["source"]
    assert axis["high"] < 100  # the test split's scores (shifted by 100) play no part
    untested = score_axis(run_dir, loaded.threshold)
    assert untested["low"] is None and untested["high"] is None and "first image" in untested["source"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SCORES_FILE).write_text("split,path\nval,a\n")  # no score column: read as no validation scores
    assert score_axis(broken, loaded.threshold)["low"] is None
    inf = Threshold(value=math.inf, rule="conformal_fpr(alpha=0.001)", fitted_on="x", n_fit=24)
    no_cut = score_axis(folder, inf)  # nothing is ever flagged: the axis spans the validation scores alone
    assert (no_cut["low"], no_cut["high"]) == pytest.approx(expected_axis(scores, float(np.percentile(scores, 1))))


def test_api_sends_the_axis_once_and_each_result_its_plain_image_and_map_range(tested_run, tmp_path):
    from fastapi.testclient import TestClient
    from matplotlib import colormaps

    folder, loaded, _ = tested_run
    with TestClient(create_app(folder, run=loaded)) as client:
        axis = client.get("/model").json()["score_axis"]
        assert axis == score_axis(folder, loaded.threshold)
        bar = client.get("/colour_bar.png")
        assert bar.status_code == 200 and bar.headers["content-type"] == "image/png"
        assert "content-security-policy" in bar.headers
        colours = np.asarray(Image.open(io.BytesIO(bar.content)).convert("RGB"))[0]
        for end, value in ((colours[0], 0.0), (colours[-1], 1.0)):  # the overlay's colour map, low to high
            assert np.abs(end.astype(int) - np.round(np.array(colormaps["jet"](value)[:3]) * 255)).max() <= 1
        phantom = phantoms(1, seed=7)[0, 0].numpy()
        buffer = io.BytesIO()
        Image.fromarray((phantom * 65535).astype(np.uint16)).save(buffer, format="PNG")
        result = client.post("/predict", files={"file": ("a.png", buffer.getvalue(), "image/png")}).json()
    plain = Image.open(io.BytesIO(base64.b64decode(result["image_png"])))
    overlay = Image.open(io.BytesIO(base64.b64decode(result["anomaly_map_png"])))
    assert plain.mode == "L" and plain.size == overlay.size
    back = np.asarray(plain.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float64) / 255
    assert np.corrcoef(back.ravel(), phantom.ravel())[0, 1] > 0.99  # the image itself, not the heat map
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    expected = loaded.score_samples([loaded.dataset([str(tmp_path / "a.png")])[0]])[0]
    assert result["map_range"] == pytest.approx(list(np.percentile(expected.anomaly_map, (1.0, 99.5))), rel=1e-4)


AXIS_STATE = """() => [...document.querySelectorAll('#bar .tick')].map((t) =>
    [t.textContent, t.style.left, Math.round(t.getBoundingClientRect().left * 100) / 100])"""


def _upload_and_read(page, image: Path) -> dict:
    page.set_input_files("#file", str(image))
    page.locator("#size", has_text=f"{image.name}:").wait_for(timeout=30_000)
    return {"ticks": page.evaluate(AXIS_STATE), "marker": page.evaluate("document.getElementById('marker').style.left"),
            "score": page.inner_text("#score"), "source": page.inner_text("#axis-source")}


@pytest.mark.parametrize("which", ["tested", "untested"])
def test_two_images_one_axis_plain_image_colour_bar_and_an_error_clears(which, tested_run, run_dir, browser,
                                                                        tmp_path):
    folder, loaded, val_scores = tested_run
    if which == "untested":  # the same model, served from the folder without scores.csv
        folder, loaded = run_dir, LoadedRun(run_dir)
    images = []
    for i, (seed, anomaly) in enumerate(((7, "good"), (8, "bright_lesion"))):
        path = tmp_path / f"scan{i}.png"
        Image.fromarray((phantoms(1, seed=seed, anomaly=anomaly)[0, 0].numpy() * 65535).astype(np.uint16)).save(path)
        images.append(path)
    expected = [loaded.score_samples([loaded.dataset([str(p)])[0]])[0].pred_score for p in images]
    assert abs(expected[0] - expected[1]) > 1e-6  # two different scores, so a marker that moves can be seen

    with background_server(create_app(folder, run=loaded)) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(url + "/")
        page.locator("#model", has_text="aeflow").wait_for()  # no wait_for_function: the CSP forbids eval
        first = _upload_and_read(page, images[0])
        page.screenshot(path=str(tmp_path / f"{which}_first.png"), full_page=True)
        second = _upload_and_read(page, images[1])
        page.screenshot(path=str(tmp_path / f"{which}_second.png"), full_page=True)

        # the axis did not move: same tick labels, same positions (style and pixels), same stated source
        assert len(first["ticks"]) >= 3
        assert first["ticks"] == second["ticks"] and first["source"] == second["source"]
        assert first["marker"] != second["marker"]  # while the score marker did
        labels = [float(t[0]) for t in first["ticks"]]
        assert labels == sorted(labels)
        if which == "tested":
            low, high = expected_axis(val_scores, loaded.threshold.value)
            assert "validation scores" in first["source"]
            for label, left, _ in first["ticks"]:  # each tick where the validation-fixed axis puts its value
                assert float(left.rstrip("%")) == pytest.approx(100 * (float(label) - low) / (high - low), abs=0.01)
            for state, score in zip((first, second), expected):
                place = min(100.0, max(0.0, 100 * (score - low) / (high - low)))
                assert float(state["marker"].rstrip("%")) == pytest.approx(place, abs=0.01)
        else:
            assert "first image" in first["source"]

        # the plain image beside the overlay, and the colour bar with its meaning and this image's map values
        for selector in ("#plain", "#overlay"):
            assert page.get_attribute(selector, "src").startswith("data:image/png;base64,")
            assert page.evaluate(f"document.querySelector('{selector}').naturalWidth") >= IMAGE_SIZE
        plain, overlay = (page.locator(s).bounding_box() for s in ("#plain", "#overlay"))
        assert plain["x"] + plain["width"] <= overlay["x"] and abs(plain["y"] - overlay["y"]) < 2  # side by side
        assert page.evaluate("document.getElementById('colourbar').complete && "
                             "document.getElementById('colourbar').naturalWidth") > 0
        assert float(page.inner_text("#map-low")) < float(page.inner_text("#map-high"))
        assert "within each image" in page.inner_text("#legend")

        # an error clears the previous image's result instead of leaving it under the message
        page.set_input_files("#file", {"name": "fake.png", "mimeType": "image/png", "buffer": b"not an image" * 20})
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error").startswith("415")
        assert not page.is_visible("#result")
        assert page.get_attribute("#overlay", "src") is None and page.get_attribute("#plain", "src") is None
        assert page.inner_text("#verdict") == "" and page.inner_text("#score") == ""
        page.screenshot(path=str(tmp_path / f"{which}_error.png"), full_page=True)
        # and the next good image replaces the error, on the same axis
        again = _upload_and_read(page, images[0])
        assert not page.is_visible("#error") and page.is_visible("#result")
        assert again["ticks"] == first["ticks"] and again["marker"] == first["marker"]
        page.close()
