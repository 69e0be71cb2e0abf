"""The scikit-learn / PyOD-style AnomalyDetector: fit, score, threshold, save and load, parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aeflow.data.synthetic import make_phantom
from aeflow.errors import ConfigError
from aeflow.estimator import AnomalyDetector
from aeflow.serving.runtime import LoadedRun

SMALL = {"backbone": "efficientnet_lite0", "flow_steps": 2, "subnet": "conv", "decoder_widths": [32, 16, 8]}


def phantoms(n: int, seed: int, size: int, anomaly: str = "good") -> np.ndarray:
    return np.stack([make_phantom(seed, i, size=size, difficulty=0.0, anomaly=anomaly)[0] for i in range(n)])


@pytest.fixture(scope="module")
def fitted():
    """AE-FLOW (pretrained EfficientNet-Lite0 trunk) fitted on 60 normal 128 px phantoms for 4 epochs (~12 s), with
    aeflow's defaults (two flow stages, per-image feature norm, the memory reference and the label-free blend):
    image AUROC 0.884 on the 60 phantoms below (0.878 with the per-position Gaussian reference). The default before
    any reference (one stride-16 flow) scored 0.48 here, and the per-channel norm with the NLL-only blend 0.73 with
    today's two stages. The numbers: `python benchmarks/phantom_checks.py`.
    """
    from .conftest import one_thread

    with one_thread():
        detector = AnomalyDetector("aeflow", threshold_rule="fpr:0.1", epochs=4, intensity="unit", **SMALL)
        return detector.fit(phantoms(60, seed=0, size=128)), phantoms(60, seed=0, size=128)


def test_fit_scores_and_threshold_follow_pyod_conventions(fitted):
    detector, X = fitted
    assert detector.decision_scores_.shape == (60,) and np.isfinite(detector.decision_scores_).all()
    np.testing.assert_allclose(detector.decision_function(X), detector.decision_scores_, rtol=1e-6)
    assert np.isfinite(detector.threshold_) and detector.threshold_rule_ == "conformal_fpr(alpha=0.1)"
    assert detector.labels_.tolist() == (detector.decision_scores_ > detector.threshold_).astype(int).tolist()
    # 12 held-out normals: the conformal threshold is their 12th-of-12 order statistic, so none of them is flagged,
    # and images trained on score at most as high on the whole.
    assert detector.labels_.mean() <= 0.1


def test_fitted_detector_separates_lesions(fitted):
    """Image AUROC on 30 normal vs 30 lesion phantoms of unseen subjects; 0.5 +- 0.075 (1 sd) under the null."""
    detector, _ = fitted
    normal, lesion = phantoms(30, seed=21, size=128), phantoms(30, seed=22, size=128, anomaly="bright_lesion")
    scores = detector.decision_function(np.concatenate([normal, lesion]))
    assert roc_auc_score([0] * 30 + [1] * 30, scores) >= 0.7
    assert detector.predict(lesion).mean() > detector.predict(normal).mean()


def test_save_load_round_trip_is_a_servable_run(fitted, tmp_path):
    detector, X = fitted
    folder = detector.save(tmp_path / "detector")
    loaded = AnomalyDetector.load(folder)
    assert loaded.threshold_ == detector.threshold_ and loaded.get_params() == detector.get_params()
    np.testing.assert_array_equal(loaded.decision_function(X[:8]), detector.decision_function(X[:8]))
    np.testing.assert_array_equal(loaded.labels_, detector.labels_)
    run = LoadedRun(folder)  # the saved folder is a run folder: predict / export / serve accept it
    assert run.threshold.value == detector.threshold_ and run.image_size == 128


def test_contamination_sets_the_pyod_threshold_on_a_list_of_paths(tmp_path):
    from PIL import Image

    from .conftest import one_thread

    paths = []
    for i, image in enumerate(phantoms(20, seed=3, size=48)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    with one_thread():
        detector = AnomalyDetector("aeflow", contamination=0.1, epochs=1, image_size=32, **SMALL).fit(paths)
    assert detector.decision_scores_.shape == (20,)
    assert detector.threshold_ == pytest.approx(np.quantile(detector.decision_scores_, 0.9))
    assert detector.labels_.sum() == 2
    # a batch of 5 instead of 16: float32 sums in another order
    np.testing.assert_allclose(detector.decision_function(paths[:5]), detector.decision_scores_[:5], rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "nope"}, "unknown model"),
    ({"contamination": 0.7}, "contamination"),
    ({"threshold_rule": "fpr:abc"}, "must be a number"),
    ({"threshold_rule": "median"}, "use fpr:ALPHA"),
    ({"threshold_rule": "fpr:1.5"}, "alpha"),
    ({"epochs": 0}, "epochs"),
    ({"image_size": 100}, "multiple of 16"),
    ({"channels": 2}, "channels"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"intensity": "brightest"}, "intensity"),
])
def test_parameters_are_checked_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AnomalyDetector(**kwargs)


def test_unfitted_and_malformed_inputs_are_refused():
    detector = AnomalyDetector("aeflow", **SMALL)
    with pytest.raises(ConfigError, match="not fitted"):
        detector.predict(np.zeros((1, 32, 32)))
    with pytest.raises(ConfigError, match="channels first"):
        detector.fit(np.zeros((4, 32, 32, 5)))
    with pytest.raises(ConfigError, match="y must hold"):
        detector.fit(np.zeros((4, 32, 32)), y=[0, 1])
