"""Semi-supervised AE-FLOW (model "aeflow_gmm"): does a handful of labelled anomalies help, and more than a probe?

PneumoniaMNIST (`--data pneumoniamnist`, the default): for each K labelled pneumonias (drawn with the run's seed
from the 3494 pneumonias of the TRAIN split, never from val or test) and each seed: fit on the 1214 normal
training images + the K labelled ones, choose the threshold on the validation split (F1-optimal, 135 normal /
389 pneumonia), report image AUROC and F1 on the test split (234 normal / 390 pneumonia).

Magnetic tile (`--data magnetic_tile`): the layout's `labelled_pool=0.2` moves 20% of each defect type (78 of
392 defects, seeded) out of the test split into the pool the K labelled defects are drawn from, for every K
(K = 0 included), so that every row is scored on the same, smaller test set (190 normal / 314 defect images).
Validation holds normals only: the threshold is a conformal 5% false-positive rate, and the mixture's gamma
is the label-free 0.5. Pixel AUROC of the model's map and of `map_posterior`, and the share of test defects
whose most probable mixture component is their own type (of the types labelled), are reported too.

K = 0 is plain AE-FLOW (the model reduces to it exactly). Prints a Markdown table (mean +- std over seeds),
writes the per-run rows as JSON lines (so a cut-short grid keeps what it measured) and a plot.

    python benchmarks/semi_supervised.py --ks 0,5,20,100 --seeds 0,1,2 --epochs 4
    python benchmarks/semi_supervised.py --model supervised_probe --ks 5,20,100 --seeds 0,1,2
    python benchmarks/semi_supervised.py --data magnetic_tile --ks 0,5,20 --seeds 0,1,2 --rows runs/semi_tiles.jsonl

`--model supervised_probe` runs the baseline every semi-supervised row is compared with (aeflow.models.probe: a
logistic regression on pooled frozen EfficientNet-Lite0 features, fitted on the same normals + K labelled images);
it needs K >= 1. Rows of both models go into one table, a block per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
DATA = {
    "pneumoniamnist": ({"layout": "medmnist", "root": str(NPZ)}, "f1_optimal"),
    "magnetic_tile": ({"layout": "magnetic_tile", "root": str(ROOT.parent / "shared" / "data" / "magnetic_tile"),
                       "labelled_pool": 0.2}, "conformal_fpr:0.05"),
}
#: Score components reported on their own besides the blended image score.
COMPONENTS = ("score_position", "score_flow_nll", "score_recon", "score_posterior", "score_posterior_latent",
              "score_posterior_image")


def scores_of(model, dataset, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Scores (pred_score, components), labels, types and, where the data have masks, the maps and masks."""
    from torch.utils.data import DataLoader

    from aeflow.data import collate

    out: dict[str, list[np.ndarray]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        predicted = model.predict(batch.image)
        for key, value in predicted.items():
            if key == "pred_score" or key.startswith("score_") or key == "type_posterior" or (
                    key in ("anomaly_map", "map_posterior") and bool(batch.has_mask.any())):
                out.setdefault(key, []).append(value.numpy())
        out.setdefault("label", []).append(batch.label.numpy())
        out.setdefault("type", []).append(np.asarray(batch.anomaly_type))
        if bool(batch.has_mask.any()):
            out.setdefault("mask", []).append(batch.mask.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def run_one(args, k: int, seed: int) -> dict:
    from aeflow.data import load_data
    from aeflow.evaluation import evaluate, make_rule, pixel_metrics
    from aeflow.training import load_run, train

    data_options, rule = DATA[args.data]
    data = load_data(image_size=args.size, seed=seed, labelled_anomalies=k, **data_options)
    if args.model == "aeflow_gmm":
        model_kwargs = {"backbone": "efficientnet_lite0", "freeze_encoder": True, "flow_steps": args.flow_steps,
                        "subnet": "conv", "decoder_widths": [64, 32, 16], **json.loads(args.model_kwargs)}
    else:
        model_kwargs = {"backbone": "efficientnet_lite0", **json.loads(args.model_kwargs)}
    config = {"model": args.model, "model_kwargs": model_kwargs, "image_size": args.size, "seed": seed,
              "max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "progress_bar": False,
              "data": data_options, "labelled_anomalies": k}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_run(train(config, Path(tmp) / "run", data=data))
    trained = time.perf_counter()
    val, test = scores_of(model, data.val), scores_of(model, data.test)
    threshold = make_rule(rule).fit(val["pred_score"], val["label"])
    metrics = evaluate(test["pred_score"], test["label"], threshold, with_test_oracle=False,
                       component_scores={c: test[c] for c in COMPONENTS if c in test})
    row = {"model": args.model, "data": args.data, "K": k, "seed": seed, "image_AUROC": metrics["image_AUROC"],
           "image_F1": metrics["image_F1"],
           **{f"AUROC_{c.removeprefix('score_')}": metrics[f"component/{c}/image_AUROC"]
              for c in COMPONENTS if c in test},
           "n_test": int(len(test["label"])), "n_test_anomalous": int(test["label"].sum())}
    weights = getattr(model, "blend_weights", dict)()  # chosen on validation (aeflow_gmm's docstring)
    row.update({key: weights[key] for key in ("gamma", "posterior_image_weight") if key in weights})
    if 0 < val["label"].sum() < len(val["label"]):
        from sklearn.metrics import roc_auc_score

        row["val_image_AUROC"] = float(roc_auc_score(val["label"], val["pred_score"]))
    for key, name in (("anomaly_map", "pixel_AUROC"), ("map_posterior", "pixel_AUROC_posterior")):
        if key in test:
            row[name] = pixel_metrics(test[key], test["mask"])["pixel_AUROC"]
    if "type_posterior" in test:
        types = list(model.anomaly_types)
        known = np.isin(test["type"], types) & (test["label"] == 1)
        guessed = np.asarray(types)[test["type_posterior"].argmax(1)]
        row["type_accuracy"] = float((guessed[known] == test["type"][known]).mean())
    row.update(train_seconds=round(trained - started, 1), test_seconds=round(time.perf_counter() - trained, 1))
    print(json.dumps(row), flush=True)
    return row


def model_of(row: dict) -> str:
    return row.get("model", "aeflow_gmm")  # rows written before the probe existed are aeflow_gmm's


KEYS = ["image_AUROC", "image_F1", "AUROC_position", "AUROC_flow_nll", "AUROC_recon", "AUROC_posterior",
        "AUROC_posterior_latent", "AUROC_posterior_image", "gamma", "posterior_image_weight", "val_image_AUROC",
        "pixel_AUROC", "pixel_AUROC_posterior", "type_accuracy"]


def table(rows: list[dict]) -> str:
    keys = [key for key in KEYS if any(key in r for r in rows)]
    lines = ["| model | K labelled | seeds | " + " | ".join(keys) + " | train s/run |",
             "|---|---:|---:|" + "---:|" * len(keys) + "---:|"]
    for model, k in sorted({(model_of(r), r["K"]) for r in rows}):
        group = [r for r in rows if r["K"] == k and model_of(r) == model]
        cells = []
        for key in keys:
            values = [r[key] for r in group if key in r]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        train_s = np.mean([r["train_seconds"] for r in group])
        lines.append(f"| {model} | {k} | {len(group)} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "image_AUROC", "test image AUROC"), (axes[1], "image_F1", "test F1 (val threshold)")):
        for model in sorted({model_of(r) for r in rows}):
            mine = [r for r in rows if model_of(r) == model]
            at = [k for k in ks if any(r["K"] == k for r in mine)]
            for r in mine:
                ax.scatter(ks.index(r["K"]), r[key], color="grey", s=12, zorder=2)
            means = [np.mean([r[key] for r in mine if r["K"] == k]) for k in at]
            stds = [np.std([r[key] for r in mine if r["K"] == k]) for k in at]
            ax.errorbar([ks.index(k) for k in at], means, yerr=stds, marker="o", capsize=4, zorder=3, label=model)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("labelled anomalies K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Semi-supervised, {data} (mean ± std over seeds; dots: runs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="pneumoniamnist")
    parser.add_argument("--ks", default="0,5,20,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--flow-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("aeflow_gmm", "supervised_probe"), default="aeflow_gmm")
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of extra model arguments")
    parser.add_argument("--rows", default=str(ROOT / "runs" / "semi_supervised.jsonl"),
                        help="JSON-lines file the per-run rows are appended to")
    parser.add_argument("--from-rows", action="store_true", help="only rebuild the table and plot from --rows")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "semi_supervised.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import aeflow.models  # noqa: F401  registers the models

    rows_path = Path(args.rows)
    if not args.from_rows:
        if not Path(DATA[args.data][0]["root"]).exists():
            sys.exit(f"{args.data} not found at {DATA[args.data][0]['root']}")
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for k in [int(k) for k in args.ks.split(",")]:
                row = run_one(args, k, seed)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("data", "pneumoniamnist") == args.data]
    print(table(rows))
    plot(rows, Path(args.plot), args.data)


if __name__ == "__main__":
    main()
