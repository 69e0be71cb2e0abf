"""Threshold rules: chosen on validation data only, conformal guarantee, and guards against fitting on test."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from aeflow.errors import ConfigError
from aeflow.evaluation import (
    ConformalFPR,
    EvaluationError,
    F1Optimal,
    TargetSensitivity,
    Threshold,
    conformal_p_values,
    evaluate,
    make_rule,
)


def test_f1_optimal_matches_brute_force_over_every_cut(split):
    scores = np.round(split["val_scores"], 1)  # ties between normals and anomalies
    labels = split["val_labels"]
    threshold = F1Optimal().fit(scores, labels)
    cuts = np.r_[-np.inf, np.unique(scores)]
    best = max(f1_score(labels, (scores > c).astype(int)) for c in cuts)
    assert f1_score(labels, threshold.predict(scores)) == pytest.approx(best, abs=1e-12)
    assert dict(threshold.details)["val_F1"] == pytest.approx(best, abs=1e-12)
    assert not np.isin(threshold.value, scores)  # the cut lies in a gap between validation scores


def test_target_sensitivity_is_the_highest_threshold_reaching_the_target(split):
    scores, labels = split["val_scores"], split["val_labels"]
    threshold = TargetSensitivity(target=0.9).fit(scores, labels)
    sensitivity = threshold.predict(scores)[labels == 1].mean()
    assert sensitivity >= 0.9
    next_cut = scores[scores > threshold.value].min()  # the next higher threshold that changes anything
    assert (scores[labels == 1] > next_cut).mean() < 0.9


def test_target_sensitivity_rank_is_immune_to_float_noise():
    """0.95 * 20 is 19.000000000000004 in floating point: 19 of 20 anomalies must be enough."""
    anomalous = np.arange(1.0, 21.0)
    scores = np.r_[np.full(5, -1.0), anomalous]
    labels = np.r_[np.zeros(5, int), np.ones(20, int)]
    threshold = TargetSensitivity(target=0.95).fit(scores, labels)
    assert threshold.predict(anomalous).sum() == 19


@pytest.mark.parametrize(("n", "alpha", "rank"), [(99, 0.1, 90), (100, 0.05, 96), (19, 0.05, 19), (9, 0.1, 9)])
def test_conformal_threshold_is_the_finite_sample_quantile(n, alpha, rank):
    normal = np.random.default_rng(n).permutation(np.arange(n, dtype=float))
    threshold = ConformalFPR(alpha=alpha).fit(normal)
    assert threshold.value == np.sort(normal)[rank - 1]
    assert dict(threshold.details)["rank"] == rank


def test_conformal_threshold_with_too_few_normals_is_infinite_and_flagged():
    threshold = ConformalFPR(alpha=0.05).fit(np.arange(18.0))  # needs ceil(1/0.05) - 1 = 19
    assert threshold.value == math.inf
    details = dict(threshold.details)
    assert details["finite"] is False and "19" in details["warning"]
    assert threshold.predict([1e9]).sum() == 0


def test_conformal_uses_only_normal_validation_scores_when_labels_are_given():
    normal, anomalous = np.arange(100.0), np.arange(1000.0, 1050.0)
    with_labels = ConformalFPR(alpha=0.1).fit(np.r_[normal, anomalous], np.r_[np.zeros(100), np.ones(50)])
    assert with_labels.value == ConformalFPR(alpha=0.1).fit(normal).value


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_conformal_false_positive_rate_is_at_most_alpha(alpha):
    """2000 draws of 100 calibration normals each; every threshold judged on 200 held-out normals."""
    rng = np.random.default_rng(int(alpha * 100))
    draws, n, held_out = 2000, 100, 200
    calibration = rng.gamma(2.0, size=(draws, n))
    thresholds = np.array([ConformalFPR(alpha=alpha).fit(c).value for c in calibration])
    new_normals = rng.gamma(2.0, size=(draws, held_out))
    mean_fpr = (new_normals > thresholds[:, None]).mean()
    # standard error of mean_fpr is about 0.0007; the guarantee is also tight: (n + 1 - k) / (n + 1)
    assert mean_fpr <= alpha + 0.003
    assert mean_fpr >= alpha - 0.015


def test_conformal_p_values_by_hand():
    p = conformal_p_values([1.0, 2.0, 3.0, 4.0], [0.0, 2.5, 4.0, 9.0])
    np.testing.assert_allclose(p, [5 / 5, 3 / 5, 2 / 5, 1 / 5])


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_p_value_at_most_alpha_flags_exactly_the_scores_above_the_conformal_threshold(alpha):
    rng = np.random.default_rng(3)
    calibration, new = rng.normal(size=57), rng.normal(0.5, 1.5, size=5000)
    threshold = ConformalFPR(alpha=alpha).fit(calibration)
    np.testing.assert_array_equal(conformal_p_values(calibration, new) <= alpha, threshold.predict(new) == 1)


def test_labelled_rules_refuse_unlabelled_validation_data(split):
    for rule in (F1Optimal(), TargetSensitivity()):
        with pytest.raises(EvaluationError, match="needs labelled validation data"):
            rule.fit(split["val_scores"])


def test_rules_from_config_names_and_bad_parameters():
    assert make_rule("conformal_fpr", alpha=0.1) == ConformalFPR(alpha=0.1)
    assert make_rule("f1_optimal").describe() == "f1_optimal()"
    assert TargetSensitivity(0.9).describe() == "target_sensitivity(target=0.9)"
    with pytest.raises(ConfigError, match="unknown threshold rule"):
        make_rule("best_on_test")
    with pytest.raises(ConfigError, match="alpha"):
        make_rule("conformal_fpr", alpha=1.5)
    with pytest.raises(ConfigError, match="conformal_fpr"):
        make_rule("conformal_fpr", quantile=0.9)


def test_threshold_round_trips_through_json_including_infinity():
    for threshold in (ConformalFPR(0.05).fit(np.arange(100.0)), ConformalFPR(0.05).fit(np.arange(3.0))):
        again = Threshold.from_dict(json.loads(json.dumps(threshold.to_dict(), allow_nan=False)))
        assert again == threshold


# --- no rule can read test labels -------------------------------------------------------------------------------


def test_evaluate_takes_only_a_fitted_threshold(split):
    for not_a_threshold in (F1Optimal(), 0.5, {"value": 0.5}, lambda s, y: 0.5, F1Optimal):
        with pytest.raises(EvaluationError, match="takes a fitted Threshold"):
            evaluate(split["test_scores"], split["test_labels"], not_a_threshold)


def test_threshold_is_immutable(split):
    threshold = F1Optimal().fit(split["val_scores"], split["val_labels"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        threshold.value = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        threshold.fitted_on = "something else"
    assert isinstance(threshold.details, tuple)  # no dict to change in place


@pytest.mark.parametrize("rule", [F1Optimal(), TargetSensitivity(0.9), ConformalFPR(0.1)])
def test_evaluate_refuses_a_threshold_fitted_on_the_test_scores(split, rule):
    test_scores, test_labels = split["test_scores"], split["test_labels"]
    fitted_on_test = rule.fit(test_scores, test_labels)
    with pytest.raises(EvaluationError, match="fitted on these very test scores"):
        evaluate(test_scores, test_labels, fitted_on_test)
    with pytest.raises(EvaluationError, match="fitted on these very test scores"):
        evaluate(list(test_scores), test_labels, fitted_on_test)  # same values in another container
    fitted_on_val = rule.fit(split["val_scores"], split["val_labels"])
    assert evaluate(test_scores, test_labels, fitted_on_val)["threshold_rule"] == rule.describe()
