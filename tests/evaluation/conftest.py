"""Synthetic scores, maps and masks with a known structure, shared by the evaluation tests."""

from __future__ import annotations

import numpy as np
import pytest


def _blob_masks(rng: np.random.Generator, n_images: int, size: int, n_anomalous: int) -> np.ndarray:
    masks = np.zeros((n_images, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_anomalous):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(size // 8, size - size // 8, 2)
            radius = rng.integers(max(2, size // 40), max(3, size // 10))
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1
    return masks


@pytest.fixture
def blob_masks():
    """make(rng, n_images, size, n_anomalous) -> N x size x size binary masks: the first n_anomalous images hold
    1-3 discs each, the rest are empty."""
    return _blob_masks


@pytest.fixture
def split():
    """Validation and test image scores: normals ~ N(0, 1), anomalies ~ N(1.5, 1), three anomaly types."""
    rng = np.random.default_rng(7)

    def draw(n_normal, n_anomalous):
        labels = np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]
        scores = np.r_[rng.normal(0, 1, n_normal), rng.normal(1.5, 1, n_anomalous)]
        return scores, labels

    val_scores, val_labels = draw(120, 40)
    test_scores, test_labels = draw(150, 90)
    types = np.array(["good"] * 150 + ["crack"] * 30 + ["stain"] * 30 + ["hole"] * 30)
    return {"val_scores": val_scores, "val_labels": val_labels, "test_scores": test_scores,
            "test_labels": test_labels, "test_types": types}
