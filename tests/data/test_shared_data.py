"""Counts and masks of the real data sets in ../shared/data (skipped when absent)."""

import numpy as np

from aeflow.data import load_data, read_mask

pytestmark = __import__("pytest").mark.shared_data


def test_pneumoniamnist_protocol(shared_data):
    data = load_data("medmnist", shared_data / "pneumoniamnist" / "pneumoniamnist.npz", image_size=28)
    assert len(data.train) == 1214 and all(r.label == 0 for r in data.train.records)
    val, test = data.val.labels, data.test.labels
    assert (np.sum(val == 0), np.sum(val == 1)) == (135, 389)
    assert (np.sum(test == 0), np.sum(test == 1)) == (234, 390)
    assert {r.anomaly_type for r in data.test.records} == {"good", "pneumonia"}
    sample = data.test[0]
    assert sample.image.shape == (1, 28, 28) and 0.0 <= sample.image.min() and sample.image.max() <= 1.0


def test_magnetic_tile_convention_and_masks(shared_data):
    data = load_data("magnetic_tile", shared_data / "magnetic_tile", image_size=64, seed=0, validate=False)
    records = data.train.records + data.val.records + data.test.records
    normals = [r for r in records if r.label == 0]
    defects = [r for r in data.test.records if r.label == 1]
    assert len(normals) == 952 and all(r.anomaly_type == "good" for r in normals)
    assert sum(r.label == 0 for r in data.test.records) == round(0.2 * 952)
    assert len(defects) == 115 + 85 + 57 + 32 + 103 and all(r.label == 0 for r in data.train.records + data.val.records)
    empty = [r for r in defects if not read_mask(r.mask).any()]
    assert len(empty) == 4 and {r.anomaly_type for r in empty} == {"uneven"}
