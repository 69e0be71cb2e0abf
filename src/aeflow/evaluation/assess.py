"""`aeflow test`: score a trained run's validation and test splits, fix the threshold on validation data,
and write threshold.json, metrics.json, metrics.csv, scores.csv (per image) and report.html into the run folder.
The shortcut audit (aeflow.evaluation.shortcuts) puts trivial image statistics beside the model in metrics.json
(`shortcut/...`) and the report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from aeflow.backends import make_predictor, summary
from aeflow.data import DataSplits, load_splits
from aeflow.evaluation.metrics import evaluate, write_metrics
from aeflow.evaluation.report import GalleryItem, collect_versions, pick_gallery, write_report
from aeflow.evaluation.shortcuts import audit, dataset_statistics, feature_knn, flat_metrics
from aeflow.evaluation.thresholds import Threshold, make_rule, save_threshold
from aeflow.errors import ConfigError
from aeflow.inference import Predictions, predict_dataset
from aeflow.training import load_run

log = logging.getLogger("aeflow.evaluation")


def default_rule(val_labels: np.ndarray) -> tuple[str, dict]:
    """F1-optimal where validation has both classes; otherwise a conformal 5% false-positive rate on normals."""
    if (val_labels == 0).any() and (val_labels == 1).any():
        return "f1_optimal", {}
    return "conformal_fpr", {"alpha": 0.05}


def fit_threshold(val: Predictions, rule: str | None = None, params: dict | None = None) -> Threshold:
    """The decision threshold, from validation scores only (the test split is never passed here)."""
    if rule is None:
        rule, params = default_rule(val.labels)
    labelled = bool(len(val.labels)) and bool((val.labels >= 0).all())
    return make_rule(rule, **(params or {})).fit(val.pred_score, val.labels if labelled else None)


def evaluate_run(
    run_dir: str | Path,
    *,
    rule: str | None = None,
    rule_params: dict | None = None,
    root: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    gallery_per_section: int = 4,
    use_threshold: bool | None = None,
    knn_audit: bool = False,
    backend: str = "auto",
) -> dict:
    """Evaluate the run in `run_dir` on its own saved splits; returns the metrics dict it wrote.

    The fitted threshold is kept in thresholds.json next to those of other rules; it becomes the one predict and
    serve use (threshold.json) when `use_threshold` is True, or when the run has none yet and it is None; an
    existing threshold.json of another rule is never replaced silently (`metrics["threshold_in_use"]` says).
    The rule and its parameters are checked before anything is loaded or scored. knn_audit adds the 1-nearest-
    neighbour distance on pooled EfficientNet-Lite0 features to the shortcut audit (aeflow.evaluation.shortcuts).
    backend: how the model scores (aeflow.backends); the choice and its measurements go to inference_backend.json
    and metrics["inference_backend"].
    """
    run_dir = Path(run_dir)
    if rule is not None:
        make_rule(rule, **(rule_params or {}))  # fail fast: a misspelt rule is refused before any scoring
    elif rule_params:
        raise ConfigError("threshold rule parameters given without a rule (--threshold-rule)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    started = time.perf_counter()
    model, config = load_run(run_dir, device=device)
    train_config = config["train"]
    data_options = train_config.get("data", {})
    records = load_splits(run_dir, root=root)
    splits = DataSplits.from_records(
        records,
        image_size=train_config["image_size"],
        channels=train_config["channels"],
        intensity=data_options.get("intensity", "auto"),
        validate=False,
    )
    loaded = time.perf_counter()

    predictor = make_predictor(model, (train_config["channels"], *splits.val.image_size), backend=backend,
                               batch_size=batch_size, device=device)
    log.info(summary(predictor.report))
    (run_dir / BACKEND_FILE).write_text(json.dumps(predictor.report, indent=2) + "\n")
    val = predict_dataset(model, splits.val, batch_size=batch_size, device=device, keep_maps=False,
                          predictor=predictor)
    threshold = fit_threshold(val, rule, rule_params)
    in_use = save_threshold(run_dir, threshold, use=use_threshold)
    scored_val = time.perf_counter()

    test = predict_dataset(model, splits.test, batch_size=batch_size, device=device, keep_maps=True,
                           keep_images=True, predictor=predictor)
    scored_test = time.perf_counter()
    metrics = evaluate(
        test.pred_score, test.labels, threshold,
        anomaly_types=test.anomaly_types,
        component_scores=test.components,
        anomaly_maps=test.anomaly_map if test.masks is not None else None,
        masks=test.masks,
        has_mask=test.has_mask,
    )
    detectors = {}
    if knn_audit:
        detectors["knn_features"] = ("distance to the nearest training normal (pooled EfficientNet-Lite0 features)",
                                     *feature_knn(splits.train, splits.val, splits.test, seed=train_config["seed"]))
    labelled_val = bool((val.labels == 0).any() and (val.labels == 1).any())
    shortcut = audit(dataset_statistics(splits.val), val.labels, dataset_statistics(splits.test), test.labels,
                     metrics.get("image_AUROC"), detectors=detectors,
                     model_val_auroc=float(roc_auc_score(val.labels, val.pred_score)) if labelled_val else None)
    metrics.update(flat_metrics(shortcut))
    for warning in shortcut["warnings"]:  # the command line shows it; this keeps it in a log file
        log.info(warning)
    write_scores(run_dir / SCORES_FILE, {"val": val, "test": test})
    metrics["model"] = train_config["model"]
    metrics["backbone"] = config["model_config"].get("backbone", "")
    metrics["seed"] = train_config["seed"]
    metrics["threshold_in_use"] = in_use
    metrics["inference_backend"] = predictor.name
    write_metrics(metrics, run_dir)

    picked = pick_gallery(test.pred_score, test.labels, threshold, per_section=gallery_per_section)
    gallery = [_gallery_item(test, i) for i in sorted({i for ids in picked.values() for i in ids})]
    timings = {
        "load model and data (s)": loaded - started,
        f"score {len(val)} validation images (s)": scored_val - loaded,
        f"score {len(test)} test images (s)": scored_test - scored_val,
        "test images per second": len(test) / max(scored_test - scored_val, 1e-9),
    }
    report = write_report(
        run_dir,
        title=f"aeflow test: {run_dir.name}",
        test_scores=test.pred_score,
        test_labels=test.labels,
        threshold=threshold,
        metrics=metrics,
        test_component_scores=test.components,
        val_scores=val.pred_score,
        val_labels=val.labels if (val.labels >= 0).all() else None,
        gallery=gallery,
        per_section=gallery_per_section,
        config=config,
        data_summary=_data_summary(records, val, test, given_root=root or data_options.get("root")),
        versions=collect_versions(),
        timings=timings,
        shortcut_audit=shortcut,
    )
    metrics["report"] = str(report)
    log.info("wrote %s", report)
    return metrics


SCORES_FILE = "scores.csv"
BACKEND_FILE = "inference_backend.json"  # which backend scored the splits, and what each candidate measured


def write_scores(path: Path, splits: dict[str, Predictions]) -> Path:
    """One row per scored image: split, path, label, anomaly type, score and score components (a paired
    comparison of two runs on the same split joins their files on split and path)."""
    import csv

    components = sorted({k for p in splits.values() for k in p.components})
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "path", "label", "anomaly_type", "pred_score", *components])
        for name, predictions in splits.items():
            for i in range(len(predictions)):
                writer.writerow([name, predictions.paths[i], int(predictions.labels[i]), predictions.anomaly_types[i],
                                 repr(float(predictions.pred_score[i])),
                                 *(repr(float(predictions.components[c][i])) if c in predictions.components else ""
                                   for c in components)])
    temporary.replace(path)
    return path


def _gallery_item(test: Predictions, i: int) -> GalleryItem:
    has_mask = test.has_mask is not None and bool(test.has_mask[i])
    return GalleryItem(
        image=test.images[i],
        score=float(test.pred_score[i]),
        label=int(test.labels[i]),
        path=test.paths[i],
        reconstruction=None if test.reconstruction is None else test.reconstruction[i],
        anomaly_map=None if test.anomaly_map is None else test.anomaly_map[i],
        mask=test.masks[i] if has_mask else None,
    )


def _data_summary(records, val: Predictions, test: Predictions, given_root=None) -> dict:
    def counts(labels: np.ndarray) -> str:
        return f"{int((labels == 0).sum())} normal / {int((labels == 1).sum())} anomalous"

    return {
        "layout": records.layout,
        "root": str(given_root) if given_root else records.root or "(generated)",  # as the user wrote it
        "train": f"{len(records.train)} normal",
        "val": counts(val.labels),
        "test": counts(test.labels),
    }
