"""AE-FLOW on the real PneumoniaMNIST (../shared/data/pneumoniamnist): the paper's chest X-ray protocol.

Fit on the 1214 normal training images, choose the threshold on the validation split (F1-optimal, 135 normal /
389 pneumonia), report on the 624 test images (234 normal / 390 pneumonia: the paper's test set), for several
seeds. Prints a Markdown table (mean +- std over seeds) and writes it, with the per-seed rows, to --out.

    python benchmarks/pneumonia.py --preset chest_xray --backbone efficientnet_lite0 --size 64 --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_table, machine, peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
KEYS = ["image_AUROC", "image_AP", "image_F1", "image_ACC", "image_SEN", "image_SPE",
        "component/score_flow/image_AUROC", "component/score_flow_nll/image_AUROC",
        "component/score_recon/image_AUROC", "image_F1_test_oracle"]
PAPER = {"image_AUROC": 0.9200, "image_F1": 0.8892, "image_ACC": 0.8558, "image_SEN": 0.9128}


def run_seed(args, seed: int) -> dict:
    from aeflow.evaluation.assess import evaluate_run
    from aeflow.training import train

    run_dir = Path(args.runs) / f"pneumonia-{args.preset}-{args.backbone}-{args.size}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    model_kwargs = {"backbone": args.backbone, "freeze_encoder": not args.train_encoder}
    model_kwargs.update(json.loads(args.model_kwargs))
    config = {"preset": args.preset, "image_size": args.size, "max_epochs": args.epochs, "seed": seed,
              "batch_size": args.batch_size, "model_kwargs": model_kwargs, "progress_bar": False,
              "data": {"layout": "medmnist", "root": str(NPZ), "intensity": args.intensity}}
    if args.lr:
        config["lr"] = args.lr
    if args.patience:
        config["patience"] = args.patience
    started = time.perf_counter()
    train(config, run_dir)
    trained = time.perf_counter()
    metrics = evaluate_run(run_dir, rule="f1_optimal")
    metrics.update(kept_epoch_validation(run_dir))
    metrics["train_seconds"] = trained - started
    metrics["test_seconds"] = time.perf_counter() - trained
    return metrics


def kept_epoch_validation(run_dir: Path) -> dict:
    """Validation AUROCs (135 normal / 389 pneumonia) logged at the epoch whose weights were kept (selection.json):
    the numbers a user may compare set-ups on without looking at the test set."""
    kept_epoch = json.loads((run_dir / "selection.json").read_text())["kept_epoch"]
    with open(run_dir / "curves" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss") and int(float(r["epoch"])) == kept_epoch]
    kept = rows[0]
    return {f"val/{key}": float(kept[key]) for key in kept if key.startswith("val_image_AUROC") and kept[key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="chest_xray")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--train-encoder", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of extra model arguments")
    parser.add_argument("--intensity", default="auto", help="intensity rule of the data (see `aeflow data describe`)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--out", default=None, help="Markdown file to write the table to")
    args = parser.parse_args()
    if not NPZ.is_file():
        sys.exit(f"PneumoniaMNIST not found at {NPZ}")

    import numpy as np

    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        per_seed[seed] = run_seed(args, seed)
        print(f"seed {seed}: " + ", ".join(f"{k}={per_seed[seed][k]:.4f}" for k in KEYS if k in per_seed[seed]),
              flush=True)
    lines = [
        f"Machine: {machine()}",
        f"Set-up: preset {args.preset}, {args.backbone} encoder ({'trained' if args.train_encoder else 'frozen'}), "
        f"{args.size}x{args.size} (28x28 up-sampled), intensity {args.intensity}, {args.epochs} epochs max, batch {args.batch_size}, "
        f"extra model args {args.model_kwargs}; threshold F1-optimal on validation; seeds {args.seeds}",
        "",
        "| metric | mean | std | per seed | paper |",
        "|---|---|---|---|---|",
    ]
    validation = sorted({k for m in per_seed.values() for k in m if k.startswith("val/")})
    for key in KEYS + validation + ["train_seconds", "test_seconds"]:
        values = np.array([m[key] for m in per_seed.values() if m.get(key) is not None], dtype=float)
        if len(values):
            paper = f"{PAPER[key]:.4f}" if key in PAPER else ""
            lines.append(f"| {key} | {values.mean():.4f} | {values.std(ddof=1) if len(values) > 1 else float('nan'):.4f} "
                         f"| {' '.join(f'{v:.4f}' for v in values)} | {paper} |")
    lines.append(f"| peak RSS of the whole benchmark (MB) | {peak_rss_mb():.0f} | | | |")
    table = "\n".join(lines)
    emit_table(table, args.out)


if __name__ == "__main__":
    main()
