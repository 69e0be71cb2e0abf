"""The built-in phantoms: deterministic, masks exactly for anomalies, difficulty knob, fast, and the layout."""


import numpy as np
import pytest

from aeflow.data import load_data, make_phantom
from aeflow.data.synthetic import ANOMALY_TYPES, phantom_source
from aeflow.errors import BadFileError, ConfigError


def test_deterministic_per_seed_and_varied_between_subjects():
    a, mask_a = make_phantom(7, 3, size=64, difficulty=0.4, anomaly="bright_lesion")
    make_phantom.cache_clear()
    b, mask_b = make_phantom(7, 3, size=64, difficulty=0.4, anomaly="bright_lesion")
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    others = [make_phantom(seed, index)[0] for seed, index in ((8, 3), (7, 4))]
    assert all(np.abs(a - other).mean() > 0.02 for other in others)
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0


def test_masks_non_empty_exactly_for_anomalies():
    for index in range(60):
        for anomaly in ("good", *ANOMALY_TYPES):
            image, mask = make_phantom(1, index, size=32, difficulty=1.0, anomaly=anomaly)
            assert mask.any() == (anomaly != "good"), (index, anomaly)


def test_lesions_are_inside_the_brain_and_change_only_their_region():
    normal, _ = make_phantom(2, 5, anomaly="good")
    for anomaly, sign in (("bright_lesion", 1), ("dark_lesion", -1)):
        image, mask = make_phantom(2, 5, anomaly=anomaly)
        diff = image - normal
        assert sign * diff[mask].mean() > 0.05
        assert np.abs(diff[~mask]).max() < np.abs(diff[mask]).max()
        assert normal[mask].min() > 0.2  # brain tissue, not background or skull gap


def test_difficulty_makes_lesions_smaller_and_fainter():
    def lesion_stats(difficulty):
        areas, contrasts = [], []
        for index in range(40):
            normal, _ = make_phantom(3, index, size=64, difficulty=difficulty)
            image, mask = make_phantom(3, index, size=64, difficulty=difficulty, anomaly="bright_lesion")
            areas.append(mask.sum())
            contrasts.append((image - normal)[mask].mean())
        return np.mean(areas), np.mean(contrasts)

    easy, hard = lesion_stats(0.0), lesion_stats(1.0)
    assert hard[0] < 0.6 * easy[0] and hard[1] < 0.5 * easy[1]


def test_bad_parameters():
    with pytest.raises(ConfigError, match="difficulty must be in"):
        make_phantom(0, 0, difficulty=1.5)
    with pytest.raises(ConfigError, match="anomaly must be one of"):
        make_phantom(0, 0, anomaly="tumour")
    from aeflow.data import read_raw
    with pytest.raises(BadFileError, match="generator version 0"):
        read_raw(phantom_source(0, 0, 32, 0.5, "good").replace("version=1", "version=0"))


def test_synthetic_layout_splits():
    data = load_data("synthetic", image_size=32, n_train=10, n_val=8, n_test=12, anomaly_fraction=0.25, size=48,
                     difficulty=0.3, seed=4)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 8, 12)
    assert all(r.label == 0 for r in data.train.records)
    assert sum(r.label for r in data.val.records) == 2 and sum(r.label for r in data.test.records) == 3
    sources = [r.source for split in (data.train, data.val, data.test) for r in split.records]
    assert len(set(s.split("index=")[1].split(",")[0] for s in sources)) == 30  # distinct subjects
    for sample in (data.val[i] for i in range(8)):
        assert sample.image.shape == (1, 32, 32) and (sample.mask.sum() > 0) == (sample.label == 1)
        assert sample.anomaly_type in ("good", *ANOMALY_TYPES) and sample.meta["intensity"] == "unit"
    again = load_data("synthetic", image_size=32, n_train=10, n_val=8, n_test=12, anomaly_fraction=0.25, size=48,
                      difficulty=0.3, seed=4)
    assert again.records.splits() == data.records.splits()
    assert load_data("synthetic", n_train=10, n_val=8, n_test=12, seed=5).records.test != data.records.test
