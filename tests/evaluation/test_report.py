"""The HTML report: self-contained, pictures first, and it renders in a headless browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from aeflow.evaluation import ConformalFPR, evaluate
from aeflow.evaluation.report import GalleryItem, pick_gallery, write_report


@pytest.fixture
def report_path(split, blob_masks, tmp_path) -> Path:
    """A full report on synthetic data: image scores, types, components, pixel maps and a gallery."""
    rng = np.random.default_rng(4)
    scores, labels = split["test_scores"], split["test_labels"]
    threshold = ConformalFPR(alpha=0.1).fit(split["val_scores"], split["val_labels"])
    masks = np.zeros((labels.size, 32, 32), dtype=np.float32)
    masks[labels == 1] = blob_masks(rng, int(labels.sum()), 32, int(labels.sum()))
    images = ndimage.gaussian_filter(rng.random(masks.shape), (0, 2, 2)) + 0.5 * masks
    maps = ndimage.gaussian_filter(masks, (0, 1, 1)) + rng.normal(0, 0.2, masks.shape)
    components = {"score_flow": scores + rng.normal(0, 0.5, scores.size), "score_recon": -scores}
    metrics = evaluate(scores, labels, threshold, anomaly_types=split["test_types"], component_scores=components,
                       anomaly_maps=maps, masks=masks)
    chosen = sorted({i for idx in pick_gallery(scores, labels, threshold).values() for i in idx})
    gallery = [GalleryItem(image=images[i][None], score=scores[i], label=labels[i], path=f"test/img_{i:03d}.png",
                           reconstruction=images[i] - 0.5 * masks[i], anomaly_map=maps[i], mask=masks[i])
               for i in chosen]
    return write_report(
        tmp_path / "run", title="Synthetic <test> run", test_scores=scores, test_labels=labels, threshold=threshold,
        metrics=metrics, test_component_scores=components, val_scores=split["val_scores"],
        val_labels=split["val_labels"], gallery=gallery, config={"model": "aeflow", "seed": 0},
        data_summary={"test normal": 150, "test anomalous": 90}, timings={"scoring": 1.5},
    )


def test_pick_gallery_sections(split):
    scores, labels = split["test_scores"], split["test_labels"]
    threshold = ConformalFPR(alpha=0.1).fit(split["val_scores"])
    picked = pick_gallery(scores, labels, threshold, per_section=3)
    flagged = scores > threshold.value
    assert picked["best hits"] == list(np.argsort(-np.where(labels & flagged, scores, -np.inf))[:3])
    assert picked["worst misses"] == list(np.argsort(np.where(labels & ~flagged, scores, np.inf))[:3])
    assert picked["false alarms"] == list(np.argsort(-np.where(~labels.astype(bool) & flagged, scores, -np.inf))[:3])


def test_report_is_self_contained_with_pictures_before_tables(report_path):
    html = report_path.read_text()
    assert report_path.name == "report.html"
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 5 + 3  # histogram, ROC, PR, confusion matrix, per type; 3 gallery sections
    for png in pngs:
        assert Image.open(io.BytesIO(base64.b64decode(png))).format == "PNG"
    assert html.index("<img") < html.index("<table")
    assert "Synthetic &lt;test&gt; run" in html  # escaped
    for text in ("conformal_fpr(alpha=0.1)", "image_F1_test_oracle (threshold picked on the test set",
                 "<th>image_AUROC</th>", "<td>crack</td>", "<td>score_flow</td>", "pixel_AUPRO", "scoring",
                 "&#34;seed&#34;: 0",
                 "torch", "python"):
        assert text in html, text


def _chromium() -> str | None:
    return next((c for c in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if c and Path(c).exists()), None)


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or chromium on PATH): cannot screenshot the report")
    screenshot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--window-size=1280,2400",
             report_path.as_uri()],
            check=True, capture_output=True, timeout=90,
        )
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    assert screenshot.stat().st_size > 100_000  # plots, not a blank page
    assert pixels.std() > 30
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    green = (g > r + 50) & (g > b + 50)
    red = (r > g + 80) & (r > b + 80)
    assert green.sum() > 2000 and red.sum() > 2000  # both histograms are visible
