"""The HTML report of a test run: pictures first, tables after, one self-contained file that opens offline.

Every figure is drawn with matplotlib (`Figure` objects, rendered by the Agg canvas, no pyplot state) and embedded
as a base64 PNG; the page has no scripts and no external CSS, fonts or images.
"""

from __future__ import annotations

import base64
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, precision_recall_curve, roc_curve

from aeflow.evaluation.thresholds import EvaluationError, Threshold, as_labels, as_scores

NORMAL_COLOUR, ANOMALOUS_COLOUR = "#2ca02c", "#d62728"


@dataclass
class GalleryItem:
    """One test image for the heat-map gallery. Arrays are H x W, C x H x W or H x W x C (C in 1, 3).

    anomaly_map: the pixel-level score map (H x W); mask: the ground truth (H x W) where known.
    """

    image: np.ndarray
    score: float
    label: int
    path: str = ""
    reconstruction: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None


GALLERY_SECTIONS = ("best hits", "worst misses", "false alarms")


def pick_gallery(scores, labels, threshold: Threshold, per_section: int = 4) -> dict[str, list[int]]:
    """Indices of the best hits (detected anomalies, highest scores first), worst misses (missed anomalies, lowest
    scores first) and false alarms (flagged normals, highest scores first).

    Call it on all test scores to build `GalleryItem`s only for the chosen images: `write_report` picks from the
    items it gets with this same function, so passing exactly the chosen items shows exactly them.
    """
    scores = as_scores(scores)
    labels = as_labels(labels, scores.size)
    flagged = threshold.predict(scores) == 1
    by_score_desc = np.argsort(-scores, kind="stable")
    chosen = {
        "best hits": [i for i in by_score_desc if labels[i] == 1 and flagged[i]],
        "worst misses": [i for i in by_score_desc[::-1] if labels[i] == 1 and not flagged[i]],
        "false alarms": [i for i in by_score_desc if labels[i] == 0 and flagged[i]],
    }
    return {name: [int(i) for i in idx[:per_section]] for name, idx in chosen.items()}


def collect_versions() -> dict[str, str]:
    """Python, platform and the versions of the packages a result depends on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("aeflow", "torch", "lightning", "FrEIA", "numpy", "scikit-learn", "scipy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def write_report(
    out_dir,
    *,
    title: str,
    test_scores,
    test_labels,
    threshold: Threshold,
    metrics: Mapping[str, object],
    test_component_scores: Mapping[str, Sequence[float]] | None = None,
    val_scores=None,
    val_labels=None,
    gallery: Sequence[GalleryItem] = (),
    per_section: int = 4,
    config: Mapping | None = None,
    data_summary: Mapping | None = None,
    versions: Mapping[str, str] | None = None,
    timings: Mapping[str, float] | None = None,
    shortcut_audit: Mapping | None = None,
) -> Path:
    """Write `out_dir/report.html` and return its path.

    metrics: the output of `metrics.evaluate`: shown as tables, and its per-type entries (`type/...`, present when
        evaluate got anomaly types) drawn as a bar chart.
    test_component_scores: e.g. {"score_flow": ..., "score_recon": ...}: their ROC curves join the main one.
    val_scores/val_labels: drawn as an outline in the histogram (the scores the threshold was fitted on).
    gallery: candidate items; up to `per_section` per section are chosen with `pick_gallery`.
    versions: defaults to `collect_versions()`.
    shortcut_audit: aeflow.evaluation.shortcuts.audit's result: trivial statistics beside the model, with warnings.
    """
    if not isinstance(threshold, Threshold):
        raise EvaluationError(
            f"write_report() takes the fitted Threshold used by evaluate(), got {type(threshold).__name__}"
        )
    scores = as_scores(test_scores, "test scores")
    labels = as_labels(test_labels, scores.size, "test labels")
    figures = {
        "Score histogram": _histogram(scores, labels, threshold, val_scores, val_labels),
        "ROC curve": _roc(scores, labels, threshold, test_component_scores, metrics),
        "Precision-recall curve": _precision_recall(scores, labels, threshold),
        f"Confusion matrix at threshold {threshold.value:.4g}": _confusion(scores, labels, threshold),
    }
    if any(key.startswith("type/") for key in metrics):
        figures["Per anomaly type"] = _per_type_figure(metrics)
    gallery_sections = _gallery(list(gallery), threshold, per_section)

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("aeflow.evaluation", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    html = environment.get_template("report.html.j2").render(
        title=title,
        headline=_headline(metrics),
        figures=figures,
        gallery=gallery_sections,
        metric_tables=_metric_tables(metrics),
        threshold=threshold,
        threshold_details=dict(threshold.details),
        config=json.dumps(config or {}, indent=2, default=str),
        data_summary=data_summary or {},
        versions=versions or collect_versions(),
        timings=timings or {},
        shortcut=_shortcut_table(shortcut_audit),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _png(fig: Figure) -> str:
    """A figure as a base64 PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram(scores, labels, threshold: Threshold, val_scores, val_labels) -> str:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[labels == 0], bins=bins, color=NORMAL_COLOUR, alpha=0.65,
            label=f"test normal ({(labels == 0).sum()})")
    ax.hist(scores[labels == 1], bins=bins, color=ANOMALOUS_COLOUR, alpha=0.65,
            label=f"test anomalous ({labels.sum()})")
    if val_scores is not None:
        val = as_scores(val_scores, "validation scores")
        if val_labels is not None:
            val = val[as_labels(val_labels, val.size, "validation labels") == 0]
        ax.hist(val, bins=bins, histtype="step", color="black", linewidth=1.2, label=f"validation normal ({val.size})")
    if math.isfinite(threshold.value):
        ax.axvline(threshold.value, color="black", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold.value:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _png(fig)


def _roc(scores, labels, threshold: Threshold, component_scores, metrics: Mapping[str, object]) -> str:
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    curves = {"score": (scores, "image_AUROC")}
    curves.update({name: (as_scores(c, f"component {name}"), f"component/{name}/image_AUROC")
                   for name, c in (component_scores or {}).items()})
    for i, (name, (values, auroc_key)) in enumerate(curves.items()):
        fpr, tpr, _ = roc_curve(labels, values)
        auroc = f" (AUROC {_fmt(metrics[auroc_key])})" if auroc_key in metrics else ""
        ax.plot(fpr, tpr, color=f"C{i}", linewidth=2 if i == 0 else 1.2, linestyle="-" if i == 0 else ":",
                label=name + auroc)
    predicted = threshold.predict(scores)
    ax.plot(predicted[labels == 0].mean(), predicted[labels == 1].mean(), "ko", label="at threshold")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _precision_recall(scores, labels, threshold: Threshold) -> str:
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    precision, recall, _ = precision_recall_curve(labels, scores)
    ax.plot(recall, precision, color="C0", linewidth=2, label="score")
    ax.axhline(labels.mean(), color="grey", linewidth=0.8, label=f"prevalence {labels.mean():.2f}")
    predicted = threshold.predict(scores)
    if predicted.any():
        ax.plot(predicted[labels == 1].mean(), labels[predicted == 1].mean(), "ko", label="at threshold")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def _confusion(scores, labels, threshold: Threshold) -> str:
    fig = Figure(figsize=(4, 3.6))
    ax = fig.subplots()
    matrix = confusion_matrix(labels, threshold.predict(scores), labels=[0, 1])
    ConfusionMatrixDisplay(matrix, display_labels=["normal", "anomalous"]).plot(ax=ax, cmap="Blues", colorbar=False)
    return _png(fig)


def _per_type_figure(metrics: Mapping[str, object]) -> str:
    """AUROC vs normals and recall at the threshold of each anomaly type, from `evaluate`'s `type/...` entries."""
    names = sorted({key.split("/")[1] for key in metrics if key.startswith("type/")})
    fig = Figure(figsize=(6, 0.8 + 0.45 * len(names)))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y - 0.2, [metrics[f"type/{n}/image_AUROC"] for n in names], height=0.4, color="C0",
            label="AUROC vs normals")
    ax.barh(y + 0.2, [metrics[f"type/{n}/image_SEN"] for n in names], height=0.4, color="C1",
            label="recall at threshold")
    ax.set_yticks(y, [f"{n} ({metrics[f'type/{n}/n']})" for n in names])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(names)), ncol=2)
    return _png(fig)


def _display(array: np.ndarray) -> np.ndarray:
    """H x W or H x W x 3 in [0, 1] for imshow, from H x W, C x H x W or H x W x C."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else np.zeros_like(a)


def gallery_columns(items: Sequence[GalleryItem]) -> list[str]:
    """A column only for what some image has: data without masks (or a model without reconstructions) gets none."""
    return [name for name, shown in (("image", True),
                                     ("reconstruction", any(it.reconstruction is not None for it in items)),
                                     ("heat map", True), ("mask", any(it.mask is not None for it in items)))
            if shown]


def _gallery(items: list[GalleryItem], threshold: Threshold, per_section: int) -> dict[str, str | None]:
    """One figure per section: a row per image with image, reconstruction, heat map (mask outlined) and mask; the
    reconstruction and mask columns only where some image has one."""
    if not items:
        return {}
    picked = pick_gallery([it.score for it in items], [it.label for it in items], threshold, per_section)
    maps = [np.asarray(it.anomaly_map, dtype=np.float64) for it in items if it.anomaly_map is not None]
    # one colour scale for every heat map, so colours compare across images
    vmin, vmax = (np.percentile(np.concatenate([m.ravel() for m in maps]), [1, 99]) if maps else (0.0, 1.0))
    columns = gallery_columns(items)
    out: dict[str, str | None] = {}
    for section in GALLERY_SECTIONS:
        rows = [items[i] for i in picked[section]]
        if not rows:
            out[section] = None
            continue
        fig = Figure(figsize=(2.2 * len(columns), 2.4 * len(rows)))
        axes = np.atleast_2d(fig.subplots(len(rows), len(columns)))
        for r, item in enumerate(rows):
            panels = {"image": item.image, "reconstruction": item.reconstruction, "heat map": item.anomaly_map,
                      "mask": item.mask}
            for c, name in enumerate(columns):
                panel = panels[name]
                ax = axes[r, c]
                ax.set_axis_off()
                if panel is None:
                    ax.text(0.5, 0.5, f"no {name}", ha="center", va="center", color="grey", transform=ax.transAxes)
                    continue
                if name == "heat map":
                    ax.imshow(np.asarray(panel, dtype=np.float64), cmap="inferno", vmin=vmin, vmax=vmax)
                    if item.mask is not None and np.asarray(item.mask).any():
                        ax.contour(np.asarray(item.mask, dtype=np.float64), levels=[0.5], colors="cyan", linewidths=1)
                else:
                    ax.imshow(_display(panel), cmap="gray")
                if c == 0:
                    ax.set_title(f"{Path(item.path).name or 'image'}\nscore {item.score:.4g}, "
                                 f"{'anomalous' if item.label == 1 else 'normal'}", fontsize=8)
                elif r == 0:
                    ax.set_title(name, fontsize=9)
        out[section] = _png(fig)
    return out


def _headline(metrics: Mapping[str, object]) -> list[tuple[str, str]]:
    names = {"image_AUROC": "AUROC", "image_AP": "AP", "image_F1": "F1", "image_SEN": "Sensitivity",
             "image_SPE": "Specificity", "pixel_AUROC": "Pixel AUROC", "pixel_AUPRO": "AUPRO"}
    return [(label, _fmt(metrics[key])) for key, label in names.items() if key in metrics]


def _metric_tables(metrics: Mapping[str, object]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{table name: (header, rows)}: the flat metrics, then `type/<name>/<metric>` and `component/<name>/<metric>`
    entries pivoted to one row per type or component."""
    main = []
    pivots: dict[str, dict[str, dict[str, str]]] = {"type/": {}, "component/": {}}
    for key, value in metrics.items():
        prefix = next((p for p in pivots if key.startswith(p)), None)
        if key.startswith("shortcut/"):
            continue  # a section of its own (shortcut_audit)
        if prefix is not None:
            name, metric = key.removeprefix(prefix).rsplit("/", 1)
            pivots[prefix].setdefault(name, {})[metric] = _fmt(value)
        elif key.endswith("_test_oracle"):
            main.append([f"{key} (threshold picked on the test set: for comparison with papers only)", _fmt(value)])
        else:
            main.append([key, _fmt(value)])
    tables = {"Metrics": (["metric", "value"], main)}
    for title, prefix, first in (("Per anomaly type", "type/", "type"), ("Score components", "component/", "score")):
        if pivots[prefix]:
            columns = list(dict.fromkeys(m for row in pivots[prefix].values() for m in row))
            rows = [[name] + [row.get(m, "") for m in columns] for name, row in pivots[prefix].items()]
            tables[title] = ([first] + columns, rows)
    return tables


def _shortcut_table(result: Mapping | None) -> dict | None:
    """The audit as a table for the template: the model first, then each statistic."""
    if not result:
        return None

    def auroc(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rows = [["the model", "its anomaly score", auroc(result.get("model_val_AUROC")),
             auroc(result.get("model_test_AUROC"))]]
    for name, entry in result["statistics"].items():
        mark = " (best on validation)" if name == result.get("best") else ""
        rows.append([name + mark, entry["direction"], auroc(entry["val_AUROC"]), auroc(entry["test_AUROC"])])
    return {"mode": result["mode"], "rows": rows, "warnings": list(result["warnings"]),
            "skipped": ", ".join(result["skipped"]), "margin": result["margin"]}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "undefined (NaN)" if math.isnan(value) else f"{value:.4f}"
    return str(value)
