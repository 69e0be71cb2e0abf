"""The shortcut audit: trivial image statistics scored on the model's split, oriented and chosen on validation
only, with a warning when one comes within the margin of the model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aeflow.evaluation.shortcuts import MARGIN, audit, flat_metrics, image_statistics


def _stats(rng, labels, *, contrast_shift, mean_shift):
    """Images whose contrast falls with the label (pneumonia-like) and whose mean rises with it."""
    images = []
    for label in labels:
        std = 0.2 - contrast_shift * label + rng.normal(0, 0.02)
        mean = 0.4 + mean_shift * label + rng.normal(0, 0.02)
        images.append(np.clip(rng.normal(mean, max(std, 0.01), size=(1, 16, 16)), 0, 1))
    return image_statistics(images, [(16, 16)] * len(labels), ["/nonexistent.npz#split=train,index=0"] * len(labels))


@pytest.fixture
def labelled():
    rng = np.random.default_rng(0)
    val_labels, test_labels = np.repeat([0, 1], 40), np.repeat([0, 1], 60)
    # on validation contrast separates best; on test the mean would: the best must still be contrast
    val = _stats(rng, val_labels, contrast_shift=0.08, mean_shift=0.01)
    test = _stats(rng, test_labels, contrast_shift=0.02, mean_shift=0.05)
    return val, val_labels, test, test_labels


def test_directions_and_the_best_statistic_are_chosen_on_validation(labelled):
    val, val_labels, test, test_labels = labelled
    result = audit(val, val_labels, test, test_labels, model_test_auroc=0.99)
    assert result["statistics"]["contrast"]["direction"] == "lower = anomalous"
    assert result["statistics"]["mean"]["direction"] == "higher = anomalous"
    assert result["best"] == "contrast"
    assert result["statistics"]["mean"]["test_AUROC"] > result["statistics"]["contrast"]["test_AUROC"]
    assert result["best_test_AUROC"] == pytest.approx(roc_auc_score(test_labels, -test["contrast"]))
    assert {"aspect_ratio", "file_size"} <= set(result["skipped"])  # constant / unknown: left out
    assert result["warnings"] == []
    # the test labels never choose anything: flipped, the directions and the best stay
    flipped = audit(val, val_labels, test, 1 - test_labels, model_test_auroc=0.99)
    assert flipped["best"] == "contrast" and all(
        flipped["statistics"][n]["direction"] == result["statistics"][n]["direction"] for n in result["statistics"])
    assert flipped["best_test_AUROC"] == pytest.approx(1 - result["best_test_AUROC"])


def test_a_model_no_better_than_the_best_statistic_is_warned_about(labelled):
    val, val_labels, test, test_labels = labelled
    best = audit(val, val_labels, test, test_labels, None)["best_test_AUROC"]
    for model, warned in ((best + 2 * MARGIN, False), (best + MARGIN / 2, True), (best - 0.1, True)):
        result = audit(val, val_labels, test, test_labels, model_test_auroc=model)
        assert bool(result["warnings"]) is warned, (model, result["warnings"])
    assert "contrast (the best on validation) alone ranks the test split" in result["warnings"][0]
    flat = flat_metrics(result)
    assert flat["shortcut/best"] == "contrast" and flat["shortcut/contrast_test_AUROC"] == pytest.approx(best)
    assert "shortcut" in flat["shortcut/warning"]


def test_normal_only_validation_uses_the_label_free_deviation_and_warns_for_any_statistic():
    rng = np.random.default_rng(1)
    val_labels, test_labels = np.zeros(40, int), np.repeat([0, 1], 50)
    val = _stats(rng, val_labels, contrast_shift=0.08, mean_shift=0.0)
    test = _stats(rng, test_labels, contrast_shift=0.08, mean_shift=0.0)
    result = audit(val, val_labels, test, test_labels, model_test_auroc=0.6)
    assert result["best"] is None and result["mode"].startswith("deviation")
    centre = np.median(val["contrast"])
    spread = np.median(np.abs(val["contrast"] - centre))
    expected = roc_auc_score(test_labels, np.abs(test["contrast"] - centre) / spread)
    assert result["statistics"]["contrast"]["test_AUROC"] == pytest.approx(expected) and expected > 0.9
    assert any("contrast alone" in w for w in result["warnings"])


def test_aeflow_test_writes_the_audit_and_per_image_scores(tmp_path):
    from aeflow.data import DataSplits, load_splits
    from aeflow.evaluation.assess import evaluate_run
    from aeflow.evaluation.shortcuts import dataset_statistics
    from aeflow.training import train

    run = train({"model": "aeflow", "model_kwargs": {"backbone": "resnet18", "pretrained": False, "flow_steps": 2,
                                                     "subnet": "conv", "decoder_widths": [32, 16, 8]},
                 "data": {"layout": "synthetic", "n_train": 16, "n_val": 12, "n_test": 12}, "image_size": 64,
                 "batch_size": 8, "max_epochs": 1, "progress_bar": False, "accelerator": "cpu"}, tmp_path / "run")
    metrics = evaluate_run(run, device="cpu")
    stored = json.loads((run / "metrics.json").read_text())
    backend = json.loads((run / "inference_backend.json").read_text())  # which backend scored the splits, and why
    assert stored["inference_backend"] == backend["backend"] in ("eager", "channels_last", "onnxruntime")
    assert stored["shortcut/best"] in ("mean", "contrast", "dark_fraction", "sharpness")
    # the audit's number is the statistic's AUROC on this run's own test split, in the direction validation chose
    splits = DataSplits.from_records(load_splits(run), image_size=64, channels=1, validate=False)
    test_stats, val_stats = dataset_statistics(splits.test), dataset_statistics(splits.val)
    val_auroc = roc_auc_score(splits.val.labels, val_stats["contrast"])
    sign = 1 if val_auroc >= 0.5 else -1
    assert stored["shortcut/contrast_test_AUROC"] == pytest.approx(
        roc_auc_score(splits.test.labels, sign * test_stats["contrast"]))
    report = (run / "report.html").read_text()
    assert "Shortcut audit" in report and "the model" in report
    with open(run / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows].count("test") == 12 and [r["split"] for r in rows].count("val") == 12
    test_scores = [float(r["pred_score"]) for r in rows if r["split"] == "test"]
    labels = [int(r["label"]) for r in rows if r["split"] == "test"]
    assert roc_auc_score(labels, test_scores) == pytest.approx(metrics["image_AUROC"])


def test_feature_knn_is_the_distance_to_the_nearest_training_normal():
    """Pooled pretrained EfficientNet-Lite0 features: a validation image that is also a training image is at
    distance 0, new images are not. (It does not separate the phantoms' small lesions, AUROC 0.55 here: a global
    average pools them away; on PneumoniaMNIST it is measured in docs/shortcut_audit.md.)"""
    from torch.utils.data import ConcatDataset, Subset

    from aeflow.data import load_data
    from aeflow.evaluation.shortcuts import feature_knn

    data = load_data("synthetic", None, image_size=64, seed=0, n_train=24, n_val=8, n_test=24, size=64)
    val = ConcatDataset([Subset(data.train, [0, 1]), data.val])
    val_scores, test_scores = feature_knn(data.train, val, data.test, max_train=1000)
    assert val_scores.shape == (2 + len(data.val),) and test_scores.shape == (len(data.test),)
    assert np.allclose(val_scores[:2], 0, atol=1e-5) and (val_scores[2:] > 1e-4).all()
    labels = data.test.labels
    assert (test_scores > 1e-4).all() and np.isfinite(test_scores).all()
    # it joins the audit as a label-free detector of fixed direction, eligible as the best on validation
    result = audit({n: np.ones(len(val)) for n in ("mean", "contrast", "dark_fraction", "sharpness",
                                                    "aspect_ratio", "file_size")}, np.r_[[0, 0], data.val.labels],
                   {n: np.ones(len(labels)) for n in ("mean", "contrast", "dark_fraction", "sharpness",
                                                       "aspect_ratio", "file_size")}, labels, 0.99,
                   detectors={"knn_features": ("farther = anomalous", val_scores, test_scores)})
    assert result["best"] == "knn_features"
    assert result["best_test_AUROC"] == pytest.approx(roc_auc_score(labels, test_scores))


def test_the_report_shows_what_the_data_has_and_the_root_as_given():
    from types import SimpleNamespace

    from aeflow.evaluation.assess import _data_summary
    from aeflow.evaluation.report import GalleryItem, gallery_columns

    image = np.zeros((1, 8, 8), np.float32)
    plain = GalleryItem(image=image, score=1.0, label=1, path="a.png", anomaly_map=image[0])
    assert gallery_columns([plain]) == ["image", "heat map"]  # no "no mask" column on data without masks
    masked = GalleryItem(image=image, score=1.0, label=1, path="b.png", anomaly_map=image[0], mask=image[0],
                         reconstruction=image)
    assert gallery_columns([plain, masked]) == ["image", "reconstruction", "heat map", "mask"]
    records = SimpleNamespace(layout="folder", root="/data/resolved/target", train=[1, 2])
    none = SimpleNamespace(labels=np.array([0, 1]))
    assert _data_summary(records, none, none, given_root="data/link")["root"] == "data/link"
    assert _data_summary(records, none, none)["root"] == "/data/resolved/target"


def test_sharpness_is_the_mean_neighbour_difference():
    """A 2 x 3 image [[0, 1, 0], [0, 0, 0]]: horizontal differences 1, 1, 0, 0 and vertical 0, 1, 0 -> 3 / 7; a
    constant image has none; a checkerboard the most."""
    from aeflow.evaluation.shortcuts import _sharpness, image_statistics

    assert _sharpness(np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])) == pytest.approx(3 / 7)
    flat, board = np.full((1, 8, 8), 0.5), (np.indices((8, 8)).sum(0) % 2)[None].astype(float)
    stats = image_statistics([flat, board], [(8, 8), (8, 8)], ["a.png", "b.png"])
    assert stats["sharpness"].tolist() == [0.0, 1.0]
