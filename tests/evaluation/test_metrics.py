"""Image and pixel metrics against scikit-learn and a plain reference AUPRO; aggregation and metric files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from aeflow.evaluation import (
    ConformalFPR,
    EvaluationError,
    F1Optimal,
    aggregate,
    evaluate,
    image_metrics,
    metrics_at_threshold,
    oracle_f1_on_test,
    pixel_metrics,
    write_aggregate,
    write_metrics,
)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Obviously correct and slow: for every distinct score t, flag pixels >= t, measure the FPR over all normal
    pixels and the mean overlap of the 8-connected ground-truth regions of each image; integrate up to max_fpr."""
    truth = masks > 0.5
    regions = []  # (image index, boolean mask of one region)
    for i, image_truth in enumerate(truth):
        labelled, n = ndimage.label(image_truth, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append(flagged[~truth].mean())
        pros.append(np.mean([flagged[i][region].mean() for i, region in regions]))
    area = 0.0
    for j in range(1, len(fprs)):
        if fprs[j] <= max_fpr:
            area += (fprs[j] - fprs[j - 1]) * (pros[j] + pros[j - 1]) / 2
        else:  # the last, partial trapezoid up to max_fpr
            pro_at_max = pros[j - 1] + (pros[j] - pros[j - 1]) * (max_fpr - fprs[j - 1]) / (fprs[j] - fprs[j - 1])
            area += (max_fpr - fprs[j - 1]) * (pro_at_max + pros[j - 1]) / 2
            break
    return area / max_fpr


@pytest.fixture
def small_maps(blob_masks):
    """6 images of 24 x 24: 4 with lesions (several regions), 2 normal; scores quantised so that many tie."""
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, 6, 24, 4)
    maps = np.round(ndimage.gaussian_filter(masks, (0, 1.5, 1.5)) + rng.normal(0, 0.25, masks.shape), 1)
    return maps, masks


def test_threshold_metrics_match_scikit_learn(split):
    scores, labels = np.round(split["test_scores"], 1), split["test_labels"]
    threshold = F1Optimal().fit(split["val_scores"], split["val_labels"])
    predicted = (scores > threshold.value).astype(int)
    m = metrics_at_threshold(scores, labels, threshold)
    assert m["image_F1"] == pytest.approx(f1_score(labels, predicted))
    assert m["image_ACC"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["image_SEN"] == pytest.approx(recall_score(labels, predicted))
    assert m["image_SPE"] == pytest.approx(recall_score(labels, predicted, pos_label=0))
    assert m["image_BACC"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    matrix = [[m["image_TN"], m["image_FP"]], [m["image_FN"], m["image_TP"]]]
    assert matrix == confusion_matrix(labels, predicted).tolist()


def test_image_auroc_and_ap_match_scikit_learn_with_ties(split):
    scores, labels = np.round(split["test_scores"]), split["test_labels"]
    m = image_metrics(scores, labels)
    assert m["image_AUROC"] == roc_auc_score(labels, scores)
    assert m["image_AP"] == average_precision_score(labels, scores)
    assert image_metrics(np.full(labels.size, 3.0), labels)["image_AUROC"] == 0.5


def test_single_class_labels_are_a_clear_error(split):
    scores = split["test_scores"][:20]
    for labels in (np.zeros(20, int), np.ones(20, int)):
        with pytest.raises(EvaluationError, match="needs both normal"):
            image_metrics(scores, labels)


def test_bad_inputs_are_named():
    with pytest.raises(EvaluationError, match="NaN or infinite"):
        image_metrics([0.1, math.nan], [0, 1])
    with pytest.raises(EvaluationError, match="0 \\(normal\\) or 1"):
        image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(EvaluationError, match="shape \\(2,\\)"):
        image_metrics([0.1, 0.2], [0, 1, 1])


def test_pixel_auroc_matches_scikit_learn_on_flattened_pixels(small_maps):
    maps, masks = small_maps
    assert pixel_metrics(maps, masks)["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_matches_the_reference(small_maps):
    maps, masks = small_maps
    assert pixel_metrics(maps, masks)["pixel_AUPRO"] == pytest.approx(reference_aupro(maps, masks), abs=1e-12)


def test_aupro_weights_regions_not_pixels():
    """One big region fully found and one small region missed: the PRO curve starts at 0.5 (not at 400/404 as a
    pixel-weighted overlap would), then rises linearly to 1 at FPR 1 (all other pixels tie at 0), reaching 0.65
    at FPR 0.3: normalised area (0.5 + 0.65) / 2."""
    masks = np.zeros((1, 40, 40))
    masks[0, 2:22, 2:22] = 1  # 400 pixels
    masks[0, 30:32, 30:32] = 1  # 4 pixels
    maps = np.zeros_like(masks)
    maps[0, 2:22, 2:22] = 1.0
    m = pixel_metrics(maps, masks)
    assert m["pixel_AUPRO"] == pytest.approx(0.575)
    assert m["pixel_AUPRO"] == pytest.approx(reference_aupro(maps, masks))


def test_perfect_maps_score_one(small_maps):
    _, masks = small_maps
    m = pixel_metrics(masks * 2.0, masks)
    assert (m["pixel_AUROC"], m["pixel_AUPRO"], m["pixel_Dice"]) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)


def test_best_dice_known_answer():
    """Mask of 10 pixels. Scores: 8 lesion pixels at 3, 2 at 1; 4 normal pixels at 2; the rest 0.
    Cuts: >=3 gives Dice 2*8/(8+10) = 16/18; >=2 gives 2*8/(12+10) = 16/22; >=1 gives 2*10/(14+10) = 20/24."""
    masks = np.zeros((2, 10, 10))
    masks[0, 0, :10] = 1
    maps = np.zeros_like(masks)
    maps[0, 0, :8], maps[0, 0, 8:10] = 3.0, 1.0
    maps[1, 5, :4] = 2.0
    assert pixel_metrics(maps, masks)["pixel_Dice"] == pytest.approx(16 / 18)


def test_empty_masks_give_undefined_pixel_metrics_with_a_reason():
    m = pixel_metrics(np.random.default_rng(0).random((3, 8, 8)), np.zeros((3, 8, 8)))
    assert all(math.isnan(m[k]) for k in ("pixel_AUROC", "pixel_AUPRO", "pixel_Dice"))
    assert "no anomalous pixel" in m["pixel_undefined_reason"]


def test_evaluate_collects_every_metric(split, blob_masks):
    threshold = ConformalFPR(alpha=0.1).fit(split["val_scores"], split["val_labels"])
    scores, labels, types = split["test_scores"], split["test_labels"], split["test_types"]
    rng = np.random.default_rng(2)
    masks = blob_masks(rng, labels.size, 16, 0)
    masks[labels == 1] = blob_masks(rng, int(labels.sum()), 16, int(labels.sum()))
    maps = ndimage.gaussian_filter(masks, (0, 1, 1)) + rng.normal(0, 0.3, masks.shape)
    has_mask = np.arange(labels.size) % 3 != 0
    flow, recon = scores + rng.normal(0, 0.5, scores.size), -scores
    m = evaluate(scores, labels, threshold, anomaly_types=types, component_scores={"score_flow": flow,
                 "score_recon": recon}, anomaly_maps=maps, masks=masks, has_mask=has_mask)

    assert m["threshold"] == threshold.value and m["threshold_rule"] == "conformal_fpr(alpha=0.1)"
    assert m["threshold/alpha"] == 0.1 and m["threshold_n_fit"] == split["val_scores"].size
    assert m["image_AUROC"] == roc_auc_score(labels, scores)
    assert m["image_F1_test_oracle"] >= m["image_F1"]
    assert (m["n_test_normal"], m["n_test_anomalous"]) == (150, 90)
    crack = (types == "crack") | (labels == 0)
    assert m["type/crack/image_AUROC"] == roc_auc_score(labels[crack], scores[crack])
    assert m["type/crack/image_SEN"] == (scores[types == "crack"] > threshold.value).mean()
    assert m["type/crack/n"] == 30 and "type/good/n" not in m
    assert m["component/score_recon/image_AUROC"] == pytest.approx(1 - m["image_AUROC"])
    assert m["component/score_flow/image_AP"] == average_precision_score(labels, flow)
    assert m["n_pixel_images"] == has_mask.sum()
    assert m["pixel_AUROC"] == pytest.approx(roc_auc_score(masks[has_mask].ravel(), maps[has_mask].ravel()))


def test_oracle_f1_is_reported_under_its_own_name(split):
    scores, labels = split["test_scores"], split["test_labels"]
    oracle = oracle_f1_on_test(scores, labels)
    cuts = np.r_[-np.inf, np.unique(scores)]
    assert oracle["image_F1_test_oracle"] == pytest.approx(max(f1_score(labels, scores > c) for c in cuts))
    assert "image_F1_test_oracle" not in evaluate(scores, labels, ConformalFPR(0.1).fit(split["val_scores"]),
                                                  with_test_oracle=False)


def test_aggregate_over_seeds():
    runs = [{"image_AUROC": 0.8, "pixel_AUPRO": math.nan, "threshold_rule": "f1_optimal()", "image_TP": 10},
            {"image_AUROC": 0.9, "pixel_AUPRO": 0.5, "threshold_rule": "f1_optimal()", "image_TP": 12},
            {"image_AUROC": 0.7, "pixel_AUPRO": 0.7, "image_TP": 11}]
    agg = aggregate(runs)
    assert agg["image_AUROC"]["mean"] == pytest.approx(0.8)
    assert agg["image_AUROC"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert agg["image_AUROC"]["values"] == [0.8, 0.9, 0.7] and agg["image_AUROC"]["n"] == 3
    assert agg["pixel_AUPRO"]["n"] == 2 and agg["pixel_AUPRO"]["mean"] == pytest.approx(0.6)
    assert agg["image_TP"]["mean"] == 11
    assert "threshold_rule" not in agg
    assert math.isnan(aggregate([{"x": 1.0}])["x"]["std"])


def test_metric_files(tmp_path):
    metrics = {"image_AUROC": 0.75, "pixel_AUPRO": math.nan, "threshold": math.inf,
               "threshold_rule": "conformal_fpr(alpha=0.05)", "image_TP": np.int64(3)}
    json_path, csv_path = write_metrics(metrics, tmp_path / "run")
    assert json.loads(json_path.read_text()) == {"image_AUROC": 0.75, "pixel_AUPRO": None, "threshold": "inf",
                                                 "threshold_rule": "conformal_fpr(alpha=0.05)", "image_TP": 3}
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["metric", "value"] and len(rows) == 6
    assert float(dict(rows[1:])["threshold"]) == math.inf and math.isnan(float(dict(rows[1:])["pixel_AUPRO"]))

    json_path, csv_path = write_aggregate(aggregate([{"image_AUROC": 0.8}, {"image_AUROC": 0.9}]), tmp_path)
    assert json.loads(json_path.read_text())["image_AUROC"]["values"] == [0.8, 0.9]
    rows = list(csv.DictReader(csv_path.open()))
    assert float(rows[0]["mean"]) == pytest.approx(0.85) and rows[0]["values"] == "0.8;0.9"
