"""What the flow adds to AE-FLOW's per-position reference: the same Gaussians on z', on the encoder features, and on
the per-image normalised features the flow sees.

For every trained AE-FLOW run given (its own data, split and seed, from config.json), one pass over its training,
validation and test images collects, per encoder stage, the flow's output z', the raw encoder features f and the
per-image normalised features (the flow's input). On each, per-position Gaussians (full covariance + 0.01 I, as
`reference="position"` fits them) are fitted to the training images, and the image score is the mean over positions
of 0.5 x the squared Mahalanobis distance. Printed: validation (where it holds anomalies) and test image AUROC, mean
+- std over the runs, per stage and summed over the stages (the model's `score_position`).

    python benchmarks/aeflow_reference_probe.py runs/ablation/pneumoniamnist-64-auto-row7-s{0,1,2}

`--memory` adds a position-free reference beside the Gaussians: every training position's z' in one bank, each
test position scored by its Euclidean distance to the nearest bank vector (PatchCore's score, in the flow's
latent space), the image by the largest (max) or the mean of its positions' distances.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import emit_table, machine  # noqa: E402


def collect(run_dir: Path) -> dict:
    from torch.utils.data import DataLoader

    from aeflow.data import collate, load_data
    from aeflow.training import load_run
    from aeflow.training.run import _split_for_training

    model, config = load_run(run_dir)
    t = config["train"]
    data = load_data(image_size=t["image_size"], channels=t["channels"], seed=t["seed"], **t["data"])
    train_set, val_set, _, _ = _split_for_training(data, t["seed"])
    flows = [*model.side_flows, model.flow]
    out = {}
    for split, dataset in (("train", train_set), ("val", val_set), ("test", data.test)):
        acc: dict[str, list] = {"label": []}
        for batch in DataLoader(dataset, batch_size=64, collate_fn=collate):
            with torch.no_grad():
                features = model._encode(batch.image.float())
                for i, (flow, f) in enumerate(zip(flows, features)):
                    mean, std = f.mean((1, 2, 3), keepdim=True), f.std((1, 2, 3), keepdim=True)
                    acc.setdefault(f"z'{i}", []).append(flow(f)[0])
                    acc.setdefault(f"f{i}", []).append(f)
                    acc.setdefault(f"norm f{i}", []).append((f - mean) / std)
            acc["label"].append(batch.label)
        out[split] = {k: torch.cat(v) for k, v in acc.items()}
    out["strides"] = list(model.config()["stages"])
    return out


def position_nll(train: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from aeflow.nn.blocks import PositionGaussians, mahalanobis_squared

    sums = PositionGaussians()
    sums.add(train.float())
    mean, precision = sums.gaussians(0.01)
    return 0.5 * mahalanobis_squared(x.float(), mean, precision).flatten(1).mean(1)


def memory_distance(train: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, mean) over positions of each image's 1-NN distance to the bank of all training positions."""
    from aeflow.models.patchcore import nearest_neighbours

    bank = train.float().permute(0, 2, 3, 1).flatten(0, 2)
    d = nearest_neighbours(x.float().permute(0, 2, 3, 1).flatten(0, 2), bank, 1)[0].view(len(x), -1)
    return d.amax(1), d.mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory", action="store_true", help="add the nearest-neighbour memory on z' (see above)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from sklearn.metrics import roc_auc_score

    results: dict[str, list[tuple[float, float]]] = {}
    for run in args.runs:
        got = collect(run)
        strides = got.pop("strides")
        y_val, y_test = got["val"]["label"].numpy(), got["test"]["label"].numpy()
        for source in ("z'", "norm f", "f"):
            scores = {}
            for i, stride in enumerate(strides):
                key = f"{source}{i}"
                scores[f"{source}, stride {stride}"] = {s: position_nll(got["train"][key], got[s][key]) for s in ("val", "test")}
            scores[f"{source}, all stages (sum)"] = {s: sum(v[s] for v in list(scores.values())) for s in ("val", "test")}
            if args.memory and source == "z'":
                for i, stride in enumerate(strides):
                    key = f"z'{i}"
                    got_max, got_mean = {}, {}
                    for s in ("val", "test"):
                        got_max[s], got_mean[s] = memory_distance(got["train"][key], got[s][key])
                    scores[f"z' memory (1-NN), stride {stride}, max"] = got_max
                    scores[f"z' memory (1-NN), stride {stride}, mean"] = got_mean
                means = [scores[f"z' memory (1-NN), stride {stride}, mean"] for stride in strides]
                scores["z' memory (1-NN), all stages (sum of means)"] = {s: sum(m[s] for m in means)
                                                                         for s in ("val", "test")}
            for name, v in scores.items():
                val = roc_auc_score(y_val, v["val"].numpy()) if (y_val == 1).any() else float("nan")
                results.setdefault(name, []).append((val, roc_auc_score(y_test, v["test"].numpy())))
    lines = [f"Machine: {machine()}.", f"Command: `python benchmarks/aeflow_reference_probe.py {' '.join(sys.argv[1:])}`",
             "", "| per-position Gaussians on | val image AUROC | test image AUROC |", "|---|---|---|"]
    for name, values in results.items():
        a = np.array(values)
        val = "n/a" if np.isnan(a[:, 0]).all() else f"{np.nanmean(a[:, 0]):.3f} ± {np.nanstd(a[:, 0], ddof=1):.3f}"
        lines.append(f"| {name} | {val} | {a[:, 1].mean():.3f} ± {a[:, 1].std(ddof=1):.3f} |")
    table = "\n".join(lines)
    emit_table(table, args.out)


if __name__ == "__main__":
    main()
