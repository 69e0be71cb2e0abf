"""Check aeflow_gmm's score blend (gamma) on the VALIDATION split of PneumoniaMNIST, never the test split.

    python benchmarks/semi_supervised_gamma.py --ks 5,20 --seed 0

Same configuration as benchmarks/semi_supervised.py (frozen EfficientNet-Lite0, 64 px, 4 flow steps, 4 epochs).
Prints validation image AUROC of the posterior alone (gamma 1), of blends with AE-FLOW's standardised score, and
of AE-FLOW's score alone (gamma 0). Scores are standardised with the validation normals.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from semi_supervised import NPZ, scores_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="5,20")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sklearn.metrics import roc_auc_score

    from aeflow.data import load_data
    from aeflow.training import load_run, train

    for k in [int(v) for v in args.ks.split(",")]:
        data = load_data("medmnist", NPZ, image_size=64, seed=args.seed, labelled_anomalies=k)
        config = {"model": "aeflow_gmm", "model_kwargs": {"backbone": "efficientnet_lite0", "freeze_encoder": True,
                  "flow_steps": 4, "subnet": "conv", "decoder_widths": [64, 32, 16]}, "image_size": 64,
                  "seed": args.seed, "max_epochs": 4, "batch_size": 16, "lr": 1e-3, "progress_bar": False,
                  "data": {"layout": "medmnist", "root": str(NPZ)}, "labelled_anomalies": k}
        with tempfile.TemporaryDirectory() as tmp:
            model, _ = load_run(train(config, Path(tmp) / "run", data=data))
        scores, labels = scores_of(model, data.val)

        def z(values):
            return (values - values[labels == 0].mean()) / values[labels == 0].std()

        posterior = z(scores["score_posterior"])
        aeflow_score = 0.9 * z(scores["score_flow_nll"]) + 0.1 * z(scores["score_recon"])
        row = {"K": k, "split": "val"}
        for gamma in (1.0, 0.75, 0.5, 0.25, 0.0):
            row[f"gamma={gamma}"] = round(roc_auc_score(labels, gamma * posterior + (1 - gamma) * aeflow_score), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
