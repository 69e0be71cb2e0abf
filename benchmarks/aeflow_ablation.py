"""AE-FLOW ablation: one row per change, validation and test side by side, several seeds.

Each row adds one change to the row above it (the first row is AE-FLOW as it was before the changes), trains
every seed into its own run folder with `aeflow.training.train`, evaluates it with `aeflow.evaluation.assess`
(threshold on validation only) and prints a Markdown table: mean +- std over seeds of the validation AUROC of
the kept epoch (only where the validation split has labelled anomalies) and of the test image AUROC, F1 and,
with masks, pixel AUROC.

    python benchmarks/aeflow_ablation.py --data pneumoniamnist --seeds 0,1,2 --out docs/results/ablation_pneumoniamnist.md
    python benchmarks/aeflow_ablation.py --data magnetic_tile --seeds 0,1,2 --out docs/results/ablation_magnetic_tile.md

`--rows a,b` runs only some rows (each row still carries every change above it); `--jobs 2` trains two runs at a
time (one thread each). Runs trained with the same config are reused (and evaluated if they were not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import emit_table, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "pneumoniamnist": {"layout": "medmnist", "root": ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"},
    "magnetic_tile": {"layout": "magnetic_tile", "root": ROOT.parent / "shared" / "data" / "magnetic_tile"},
}
# The starting point: AE-FLOW as it was before these changes (frozen EfficientNet-Lite0, conv coupling, narrow
# decoder, fixed per-channel feature standardisation, fixed 0.9 / 0.1 blend of z-scored components, the
# checkpoint with the lowest validation loss, the residual map, one stride-16 flow, no reference). Row 7 is the
# default. (A diagonal per-position map of the stride-16 z' from validation images, an earlier default, was
# measured as row 3 with --model-kwargs '{"map_mode": "position"}'; that map is now the full reference's.)
BASE = {"backbone": "efficientnet_lite0", "subnet": "conv", "decoder_widths": [128, 64, 32],
        "feature_norm": "channel", "score_mode": "standardized", "map_mode": "residual", "stages": [16],
        "reference": "none"}
# (name, what the row changes: model arguments and training options); each row keeps the changes above it.
ROWS = [
    ("before", {}, {"select_on": "val_loss"}),
    ("+ per-image feature norm", {"feature_norm": "image"}, {}),
    ("+ checkpoint on validation AUROC", {}, {"select_on": "auto"}),
    ("+ blend fitted on validation (label-free: flow mean and max)", {"score_mode": "validated"}, {}),
    ("+ up-sampling decoder", {"decoder": "upsample"}, {}),
    ("+ fused pixel map", {"map_mode": "fused"}, {}),
    ("+ stride-8 flow", {"stages": [8, 16]}, {}),
    # Rows 4 and 5 (decoder, map) go back to what they were, the reference comes in.
    ("+ per-position reference of z' (score, map), transposed decoder", {"reference": "position", "map_mode": "position",
                                                                        "decoder": "transposed"}, {}),
    # The default: the Gaussians give way to a position-free memory of z' (a 10 % coreset per stage).
    ("+ memory of z' in place of the Gaussians (10 % coreset)", {"reference": "memory", "memory_ratio": 0.1}, {}),
]
KEYS = ("image_AUROC", "image_F1", "pixel_AUROC", "component/score_flow_nll/image_AUROC",
        "component/score_flow_max/image_AUROC", "component/score_recon/image_AUROC",
        "component/score_position/image_AUROC")


def row_config(index: int, args) -> dict:
    model_kwargs, train_options = {**BASE, "backbone": args.backbone}, {}
    for _, model_change, train_change in ROWS[: index + 1]:
        model_kwargs.update(model_change)
        train_options.update(train_change)
    model_kwargs.update(json.loads(args.model_kwargs))
    data = {"layout": DATA[args.data]["layout"], "root": str(DATA[args.data]["root"]), "intensity": args.intensity}
    return {"model": "aeflow", "model_kwargs": model_kwargs, "image_size": args.size, "max_epochs": args.epochs,
            "batch_size": 32, "lr": 1e-3, "progress_bar": False, "data": data, **train_options}


def run_one(job: tuple[int, int, dict, str]) -> dict:
    index, seed, config, run_dir = job
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from aeflow.evaluation.assess import evaluate_run
    from aeflow.training import train

    run_dir = Path(run_dir)
    trained = (run_dir / "model.safetensors").is_file() and _same_run(run_dir, config, seed)
    if trained and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    elif trained:  # trained, but the evaluation did not finish
        metrics = evaluate_run(run_dir)
    else:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train({**config, "seed": seed}, run_dir)
        metrics = evaluate_run(run_dir)
    selection = json.loads((run_dir / "selection.json").read_text())
    if selection.get("criterion") == "val_image_AUROC":
        metrics["val_image_AUROC"] = selection["value"]
    else:  # the kept epoch's validation AUROC from the curves, where validation has anomalies
        metrics["val_image_AUROC"] = kept_epoch_auroc(run_dir, selection.get("kept_epoch"))
    metrics["kept_epoch"] = selection.get("kept_epoch")
    return {"row": index, "seed": seed, **{k: metrics.get(k) for k in (*KEYS, "val_image_AUROC", "kept_epoch")}}


def _same_run(run_dir: Path, config: dict, seed: int) -> bool:
    """Whether the run in `run_dir` was trained with `config` and `seed` (then it is reused): the model
    arguments are compared with the model's full recorded config (defaults included), so that naming a default
    explicitly does not retrain a run, and a changed default does."""
    if not (run_dir / "config.json").is_file():
        return False
    stored = json.loads((run_dir / "config.json").read_text())
    train, model_config = stored["train"], stored["model_config"]
    return train["seed"] == seed and all(train.get(k) == v for k, v in config.items() if k != "model_kwargs") \
        and all(model_config.get(k) == v for k, v in config["model_kwargs"].items())


def kept_epoch_auroc(run_dir: Path, epoch: int | None) -> float | None:
    import csv

    with open(run_dir / "curves" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_image_AUROC") and r.get("epoch") != ""]
    kept = [r for r in rows if int(float(r["epoch"])) == epoch]
    return float(kept[0]["val_image_AUROC"]) if kept else None


def _tag(args) -> str:
    tag = "" if args.backbone == BASE["backbone"] else f"-{args.backbone}"
    extra = json.loads(args.model_kwargs)
    return tag + "".join(f"-{k}_{re.sub(r'[^0-9A-Za-z.]+', '', str(v))}" for k, v in sorted(extra.items()))


def cell(values: list) -> str:
    values = np.array([v for v in values if v is not None], dtype=float)
    if not len(values):
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="pneumoniamnist")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--intensity", default="auto")
    parser.add_argument("--backbone", default=BASE["backbone"], help="encoder of every row")
    parser.add_argument("--model-kwargs", default="{}", help="JSON model arguments set on top of every row")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (0 = before); default all")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not Path(DATA[args.data]["root"]).exists():
        sys.exit(f"{args.data} not found at {DATA[args.data]['root']}")
    rows = [int(r) for r in args.rows.split(",")] if args.rows else list(range(len(ROWS)))
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(i, seed, row_config(i, args), str(Path(args.runs) / f"{args.data}-{args.size}-{args.intensity.replace(':', '_')}{_tag(args)}-row{i}-s{seed}"))
            for i in rows for seed in seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    lines = [
        f"Machine: {machine()}; {args.jobs} run(s) at a time, 1 thread each.",
        f"Data: {args.data}, {args.size} px, intensity {args.intensity}, encoder {args.backbone}, extra model arguments {args.model_kwargs}; {args.epochs} epochs max, batch 32, lr 1e-3, "
        f"seeds {args.seeds}. Threshold: the default rule on validation only. Cells: mean ± std over seeds.",
        f"Command: `python benchmarks/aeflow_ablation.py {' '.join(sys.argv[1:])}`",
        "",
        "| row | change | val image AUROC (kept epoch) | test image AUROC | test F1 | test pixel AUROC "
        "| test AUROC flow NLL | test AUROC flow max | test AUROC recon | test AUROC position | kept epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in rows:
        mine = [r for r in results if r["row"] == i]
        kept = " ".join(str(r["kept_epoch"]) for r in mine)
        lines.append(f"| {i} | {ROWS[i][0]} | {cell([r['val_image_AUROC'] for r in mine])} | "
                     + " | ".join(cell([r[k] for r in mine]) for k in KEYS) + f" | {kept} |")
    table = "\n".join(lines)
    emit_table(table, args.out)


if __name__ == "__main__":
    main()
