"""AnomalyDetector as a PyOD / anomalib user drives it: the intensity rule fixed at fit, one threshold-rule
vocabulary, images of mixed sizes, channels-last arrays, anomaly maps and masks, calibrated probabilities and a
silent fit."""

from __future__ import annotations

import numpy as np
import pytest

from aeflow.data.synthetic import make_phantom
from aeflow.errors import ConfigError
from aeflow.estimator import AnomalyDetector
from aeflow.evaluation.thresholds import ConformalFPR, F1Optimal, TargetSensitivity, make_rule

SMALL = {"backbone": "efficientnet_lite0", "flow_steps": 2, "subnet": "conv", "decoder_widths": [32, 16, 8]}


def phantoms_uint8(n: int, seed: int, size: int = 32, anomaly: str = "good") -> np.ndarray:
    images = [make_phantom(seed, i, size=size, difficulty=0.0, anomaly=anomaly)[0] for i in range(n)]
    return np.round(np.stack(images) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted():
    """AE-FLOW fitted for 1 epoch on 24 normal 32 px phantoms given as uint8 (a few seconds)."""
    from .conftest import one_thread

    with one_thread():
        return AnomalyDetector("aeflow", threshold_rule="fpr:0.2", epochs=1, **SMALL).fit(phantoms_uint8(24, 0))


def test_the_intensity_rule_is_fixed_at_fit(fitted):
    """uint8 pixels and the same pixels / 255 as floats score the same: "auto" became "dtype" at fit."""
    X = phantoms_uint8(6, 5)
    assert fitted.intensity_ == "dtype"
    np.testing.assert_allclose(fitted.decision_function(X.astype(np.float32) / 255), fitted.decision_function(X),
                               rtol=1e-5, atol=1e-6)
    # floats outside [0, 1] under a full-scale rule are refused, not silently stretched
    with pytest.raises(ConfigError, match="unit"):
        fitted.decision_function(X.astype(np.float32))


def test_the_fixed_rule_survives_save_and_load(fitted, tmp_path):
    loaded = AnomalyDetector.load(fitted.save(tmp_path / "detector"))
    X = phantoms_uint8(4, 6)
    assert loaded.intensity_ == "dtype" and loaded.pixel_threshold_ == fitted.pixel_threshold_
    np.testing.assert_allclose(loaded.decision_function(X.astype(np.float64) / 255), fitted.decision_function(X),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))


@pytest.mark.parametrize("spellings, rule", [
    (["fpr:0.05", "conformal_fpr:0.05", "conformal_fpr(alpha=0.05)", " fpr:5e-2 "], ConformalFPR(0.05)),
    (["f1", "f1_optimal", "f1_optimal()"], F1Optimal()),
    (["sensitivity:0.9", "target_sensitivity:0.9", "target_sensitivity(target=0.9)"], TargetSensitivity(0.9)),
])
def test_one_threshold_rule_vocabulary(spellings, rule):
    for text in spellings:
        assert make_rule(text) == rule
        assert AnomalyDetector("aeflow", threshold_rule=text)._rule == rule
    # the command line's --threshold-rule NAME --threshold-option key=value reads the same
    assert make_rule(rule.name, **{k: v for k, v in vars(rule).items()}) == rule
    # and the name a fitted Threshold records parses back to its rule
    assert make_rule(rule.describe()) == rule


@pytest.mark.parametrize("text, message", [("fpr:x", "must be a number"), ("f1:0.5", "takes no parameter"),
                                           ("median", "unknown threshold rule"), ("fpr:0.05(alpha=0.1)", "unknown")])
def test_malformed_threshold_rules_say_what_is_accepted(text, message):
    with pytest.raises(ConfigError, match=message):
        make_rule(text)
    with pytest.raises(ConfigError, match="alpha given twice"):
        make_rule("fpr:0.05", alpha=0.1)


def test_images_of_mixed_sizes_are_resized_and_channels_last_is_explicit(fitted):
    X = phantoms_uint8(3, 7)
    bigger = phantoms_uint8(1, 7, size=48)[0]
    scores = fitted.decision_function([X[0], bigger, X[1]])  # numpy alone fails: "inhomogeneous shape"
    assert scores.shape == (3,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores[[0, 2]], fitted.decision_function(X[:2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="mixes integer and float"):
        fitted.decision_function([X[0], X[1].astype(np.float32) / 255])
    rgb_last = np.repeat(X[..., None], 3, axis=-1)
    with pytest.raises(ConfigError, match="channels_last=True"):
        fitted.decision_function(rgb_last)


def test_channels_last_arrays_read_like_channels_first(tmp_path):
    """channels_last=True reads N x H x W x C as the same pixels as N x C x H x W without it."""
    from aeflow.data import ImageDataset, Record
    from aeflow.estimator import _sources

    rgb = np.stack([phantoms_uint8(2, 8), phantoms_uint8(2, 9), phantoms_uint8(2, 10)], axis=1)  # N x 3 x H x W
    (tmp_path / "first").mkdir(), (tmp_path / "last").mkdir()
    first = _sources(rgb, tmp_path / "first")
    last = _sources(np.moveaxis(rgb, 1, -1), tmp_path / "last", channels_last=True)
    read = [np.stack([ImageDataset([Record(s, -1)], image_size=32, channels=3)[0].image.numpy() for s in x.sources])
            for x in (first, last)]
    assert first.channels == last.channels == 3 and read[0].shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(read[0], read[1])
    np.testing.assert_allclose(read[0], rgb / 255, atol=1e-6)
    assert AnomalyDetector("aeflow", channels_last=True).get_params()["channels_last"] is True


def test_detect_returns_maps_and_masks_at_the_pixel_threshold(fitted):
    X = phantoms_uint8(4, 9)
    result = fitted.detect(X)
    assert result.anomaly_map.shape == (4, 32, 32) and result.pred_mask.dtype == bool
    np.testing.assert_array_equal(result.pred_mask, result.anomaly_map > fitted.pixel_threshold_)
    np.testing.assert_allclose(result.pred_score, fitted.decision_function(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.pred_label, fitted.predict(X))
    # the pixel threshold is the conformal one on the held-out normals' map maxima: at most that share marked
    assert np.isfinite(fitted.pixel_threshold_)


def test_predict_proba_is_the_rank_among_held_out_normals(fitted):
    calibration = fitted.calibration_scores_
    assert calibration.size == 5  # 20% of 24 normals held out, rounded
    probe = np.concatenate([calibration, [calibration.max() + 1, calibration.min() - 1]])
    proba = fitted.proba_from_scores(probe)
    assert proba.shape == (7, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # a score above every held-out normal: p-value 1/6; below all: 6/6
    assert proba[5, 1] == pytest.approx(1 - 1 / 6) and proba[6, 1] == pytest.approx(0.0)
    # monotone in the score, and the fpr rule flags exactly where P(anomalous) >= 1 - alpha (alpha = 0.2 here)
    order = np.argsort(probe)
    assert np.all(np.diff(proba[order, 1]) >= 0)
    np.testing.assert_array_equal(fitted.predict_from_scores(probe), (proba[:, 1] >= 1 - 0.2 - 1e-12).astype(int))


def test_a_quiet_fit_prints_nothing(capfd):
    from .conftest import one_thread

    with one_thread():
        AnomalyDetector("aeflow", epochs=1, threshold_rule="fpr:0.3", **SMALL).fit(phantoms_uint8(20, 1))
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_predict_and_serve_find_a_fitted_threshold_by_any_spelling(tmp_path):
    from aeflow.evaluation.thresholds import save_threshold, threshold_in_use

    conformal = make_rule("fpr:0.1").fit(np.arange(30.0))
    f1 = make_rule("f1").fit(np.arange(10.0), [0] * 5 + [1] * 5)
    save_threshold(tmp_path, conformal), save_threshold(tmp_path, f1)
    for spelling in ("fpr:0.1", "conformal_fpr:0.1", "conformal_fpr(alpha=0.1)", "fpr", "conformal_fpr"):
        assert threshold_in_use(tmp_path, spelling) == conformal
    for spelling in ("f1", "f1_optimal", "f1_optimal()"):
        assert threshold_in_use(tmp_path, spelling) == f1
    with pytest.raises(ConfigError, match="no threshold fitted"):
        threshold_in_use(tmp_path, "fpr:0.2")


def test_a_folder_saved_before_the_fixed_rule_still_loads(fitted, tmp_path):
    import json

    folder = fitted.save(tmp_path / "old")
    state = json.loads((folder / "estimator.json").read_text())
    for key in ("intensity", "fitted_on", "calibration_scores", "pixel_threshold"):
        state.pop(key)
    (folder / "estimator.json").write_text(json.dumps(state))
    loaded = AnomalyDetector.load(folder)
    X = phantoms_uint8(3, 11)
    np.testing.assert_allclose(loaded.decision_function(X), fitted.decision_function(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="fit it again"):
        loaded.predict_proba(X)
