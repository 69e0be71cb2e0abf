"""The shortcut audit: how well trivial statistics of an image rank the anomalies, beside the model.

A model that does not beat the image's mean or contrast has not shown that it learned more than that. Each
statistic is one number per image, computed on the images as the model sees them (after the run's intensity rule
and resize) or from the source file:

    mean            mean intensity
    contrast        standard deviation of the intensities (RMS contrast)
    dark_fraction   share of pixels below 0.1
    sharpness       mean absolute difference between neighbouring pixels (horizontal and vertical): how much fine
                    detail the image has. On PneumoniaMNIST it ranks the test split at 0.915 with its direction
                    chosen on validation (docs/results/rows_flows.md), above every model there, and Glow's
                    bits/dim follows it (rank correlation 0.73-0.95)
    aspect_ratio    width / height of the source image (before resizing)
    file_size       bytes of the source file (the same for every image of an .npz: then left out)

How a statistic becomes a score is decided on the VALIDATION split, never on the test split:
- with labelled anomalies in validation, its sign: higher = anomalous if that ranks validation at AUROC >= 0.5,
  else lower = anomalous ("oriented"); the best statistic is the one with the highest validation AUROC;
- with normal images only, the label-free score |x - median| / MAD of the validation normals ("deviation"); no
  best one can be chosen on validation then, so the audit compares the model with each and warns for any.

Optionally (`feature_knn`, `aeflow test --knn-audit`) a label-free detector joins them: the distance of an image's
pooled frozen EfficientNet-Lite0 features (global average of the stride-16 map, L2-normalised) to the nearest of
up to 2000 training normals (cosine). Its direction is fixed (farther = anomalous); it is chosen as the best like
the statistics, on validation.

Its test AUROC is reported beside the model's; `warnings` says when one comes within `MARGIN` of the model's
test image AUROC, or above it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from aeflow.data.readers import split_source

STATISTICS = ("mean", "contrast", "dark_fraction", "sharpness", "aspect_ratio", "file_size")
#: How close (in AUROC) a trivial statistic may come to the model before the audit warns.
MARGIN = 0.02


def image_statistics(images: Iterable[np.ndarray], sizes: Iterable[tuple[int, int]],
                     paths: Iterable[str]) -> dict[str, np.ndarray]:
    """STATISTICS of each image (C x H x W in [0, 1]), its source size (height, width) and path."""
    values: dict[str, list[float]] = {name: [] for name in STATISTICS}
    for image, (height, width), path in zip(images, sizes, paths):
        pixels = np.asarray(image, dtype=np.float64)
        values["mean"].append(float(pixels.mean()))
        values["contrast"].append(float(pixels.std()))
        values["dark_fraction"].append(float((pixels < 0.1).mean()))
        values["sharpness"].append(_sharpness(pixels))
        values["aspect_ratio"].append(width / height if height else float("nan"))
        file = split_source(path)[0]
        values["file_size"].append(float(os.path.getsize(file)) if os.path.isfile(file) else float("nan"))
    return {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}


def _sharpness(pixels: np.ndarray) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring pixels (C x H x W or H x W)."""
    across = np.abs(np.diff(pixels, axis=-1))
    down = np.abs(np.diff(pixels, axis=-2))
    return float((across.sum() + down.sum()) / max(across.size + down.size, 1))


def dataset_statistics(dataset) -> dict[str, np.ndarray]:
    """`image_statistics` over an aeflow ImageDataset (decoded as the model sees it), in data set order."""
    samples = (dataset[i] for i in range(len(dataset)))
    images, sizes, paths = [], [], []
    for sample in samples:
        images.append(sample.image.numpy())
        sizes.append(tuple(sample.meta.get("original_size", sample.image.shape[1:])))
        paths.append(sample.path)
    return image_statistics(images, sizes, paths)


@torch.no_grad()
def feature_knn(train, val, test, *, backbone: str = "efficientnet_lite0", max_train: int = 2000,
                batch_size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) scores: 1 - the highest cosine similarity of an image's pooled features to a seeded
    sample of at most `max_train` training images. Needs the backbone's pretrained weights (EfficientNet-Lite0's
    ship in a pip package)."""
    from torch.utils.data import DataLoader, Subset

    from aeflow.data.sample import collate
    from aeflow.nn.backbones import create_backbone

    net = create_backbone(backbone, pretrained=True, frozen=True).eval()

    def pooled(dataset) -> torch.Tensor:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        feats = [net(batch.image).mean(dim=(2, 3)) for batch in loader]
        return torch.nn.functional.normalize(torch.cat(feats), dim=1)

    keep = np.random.default_rng(seed).permutation(len(train))[:max_train]
    bank = pooled(Subset(train, sorted(keep.tolist())))
    return tuple((1 - (pooled(d) @ bank.T).max(dim=1).values).double().numpy() for d in (val, test))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if len(set(labels.tolist())) < 2 or not np.isfinite(scores).all():
        return None
    return float(roc_auc_score(labels, scores))


def audit(val_stats: dict[str, np.ndarray], val_labels: np.ndarray, test_stats: dict[str, np.ndarray],
          test_labels: np.ndarray, model_test_auroc: float | None, *,
          detectors: dict[str, tuple[str, np.ndarray, np.ndarray]] | None = None,
          model_val_auroc: float | None = None) -> dict:
    """Orient or centre each statistic on validation, score the test split with it, and compare with the model.

    Returns {"mode", "statistics": {name: {"direction", "val_AUROC", "test_AUROC"}}, "best", "best_val_AUROC",
    "best_test_AUROC", "model_test_AUROC", "margin", "warnings"}. Statistics that are constant or undefined on
    validation (file_size of an .npz, aspect_ratio of equal-sized images) are listed as skipped.
    detectors: label-free scores of fixed direction (higher = anomalous), name -> (what it is, validation scores,
    test scores), e.g. `feature_knn`'s; they are compared like the statistics.
    """
    val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
    labelled = bool((val_labels == 0).any() and (val_labels == 1).any())
    normal = val_labels == 0 if (val_labels == 0).any() else np.ones(len(val_labels), bool)
    result: dict = {"mode": "oriented on labelled validation" if labelled
                    else "deviation from the validation normals (validation has no anomalies)",
                    "statistics": {}, "skipped": [], "model_test_AUROC": model_test_auroc,
                    "model_val_AUROC": model_val_auroc, "margin": MARGIN}
    for name in STATISTICS:
        val, test = val_stats[name], test_stats[name]
        if not (np.isfinite(val).all() and np.isfinite(test).all()) or np.ptp(val) == 0:
            result["skipped"].append(name)
            continue
        if labelled:
            val_auroc = _auroc(val_labels, val)
            direction = 1.0 if val_auroc >= 0.5 else -1.0
            entry = {"direction": "higher = anomalous" if direction > 0 else "lower = anomalous",
                     "val_AUROC": max(val_auroc, 1 - val_auroc), "test_AUROC": _auroc(test_labels, direction * test)}
        else:
            centre = np.median(val[normal])
            spread = np.median(np.abs(val[normal] - centre)) or np.std(val[normal]) or 1.0
            entry = {"direction": "|x - median| / MAD of validation normals", "val_AUROC": None,
                     "test_AUROC": _auroc(test_labels, np.abs(test - centre) / spread)}
        result["statistics"][name] = entry
    for name, (what, val, test) in (detectors or {}).items():
        result["statistics"][name] = {"direction": what, "val_AUROC": _auroc(val_labels, val) if labelled else None,
                                      "test_AUROC": _auroc(test_labels, test)}
    found = result["statistics"]
    result["warnings"] = []
    if labelled and found:
        best = max(found, key=lambda n: -1.0 if found[n]["val_AUROC"] is None else found[n]["val_AUROC"])
        result.update(best=best, best_val_AUROC=found[best]["val_AUROC"], best_test_AUROC=found[best]["test_AUROC"])
        candidates = [best]
    else:
        result.update(best=None, best_val_AUROC=None, best_test_AUROC=None)
        candidates = list(found)
    if model_test_auroc is not None:
        for name in candidates:
            stat = found[name]["test_AUROC"]
            if stat is not None and model_test_auroc - stat < MARGIN:
                chosen = " (the best on validation)" if labelled else ""
                verdict = ("above the model's {:.3f}: the model ranks worse than this trivial statistic"
                           if stat > model_test_auroc else
                           "within {margin:.2f} of the model's {:.3f}: the model does not beat this trivial statistic "
                           "by a clear margin").format(model_test_auroc, margin=MARGIN)
                result["warnings"].append(f"shortcut: the image's {name}{chosen} alone ranks the test split at "
                                          f"AUROC {stat:.3f}, {verdict}")
    return result


def flat_metrics(result: dict) -> dict[str, float | str | None]:
    """The audit as metrics.json / metrics.csv keys: shortcut/<statistic>_test_AUROC, shortcut/best, ..."""
    flat: dict = {f"shortcut/{name}_test_AUROC": entry["test_AUROC"] for name, entry in result["statistics"].items()}
    flat.update({"shortcut/mode": result["mode"], "shortcut/best": result["best"],
                 "shortcut/best_val_AUROC": result["best_val_AUROC"],
                 "shortcut/best_test_AUROC": result["best_test_AUROC"],
                 "shortcut/warning": "; ".join(result["warnings"]) or None})
    return flat
