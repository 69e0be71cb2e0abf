"""The synthetic-phantom numbers that tests and docs quote for AE-FLOW, from the tests' own set-ups.

- `trained`: tests/models/test_aeflow.py::test_tiny_trained_model_separates_lesions (128 px, 96 normal training
  phantoms, 48 labelled validation phantoms, 8 epochs), per seed: the image score and each component's AUROC on
  200 test phantoms, and the blend weights chosen on validation.
- `estimator`: tests/serving/test_estimator.py's detector (60 normal 128-px phantoms, 4 epochs, normal-only
  held-out validation), scored on 30 normal and 30 bright-lesion phantoms of unseen subjects, with the per-image and
  the per-channel feature norm.

    python benchmarks/phantom_checks.py --seeds 0,1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serving"))


def trained(seed: int) -> str:
    from aeflow.data import collate, load_data
    from aeflow.training import load_run, train

    data = {"layout": "synthetic", "n_train": 96, "n_val": 48, "n_test": 200, "difficulty": 0.0, "size": 128}
    config = {"model": "aeflow", "model_kwargs": {"backbone": "efficientnet_lite0", "flow_steps": 4, "subnet": "conv",
                                                  "decoder_widths": [64, 32, 16]},
              "data": data, "image_size": 128, "batch_size": 16, "lr": 2e-3, "max_epochs": 8, "progress_bar": False,
              "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_run(train(config, Path(tmp) / "run"))
    test = collate(list(load_data(image_size=128, seed=0, **data).test))
    out = model.predict(test.image)
    aurocs = {k: roc_auc_score(test.label.numpy(), v.numpy()) for k, v in out.items()
              if k == "pred_score" or k.startswith("score_")}
    weights = {k: round(v, 2) for k, v in model.blend_weights().items() if v}
    return f"| trained, seed {seed} | " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()) + f" | {weights} |"


def estimator(feature_norm: str, score_mode: str) -> str:
    from test_estimator import SMALL, phantoms

    from aeflow.estimator import AnomalyDetector

    normal, lesion = phantoms(30, seed=21, size=128), phantoms(30, seed=22, size=128, anomaly="bright_lesion")
    images, labels = np.concatenate([normal, lesion]), [0] * 30 + [1] * 30
    detector = AnomalyDetector("aeflow", threshold_rule="fpr:0.1", epochs=4, intensity="unit", **SMALL,
                               feature_norm=feature_norm, score_mode=score_mode).fit(phantoms(60, seed=0, size=128))
    parts = detector.model_.score_components(torch.from_numpy(images[:, None]).float())
    aurocs = {"pred_score": roc_auc_score(labels, detector.decision_function(images)),
              **{k: roc_auc_score(labels, v.numpy()) for k, v in parts.items() if k.startswith("score_")}}
    return (f"| estimator, {feature_norm} norm, {score_mode} | " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items())
            + " | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [trained(int(s)) for s in args.seeds.split(",")]
    rows += [estimator("image", "validated"), estimator("channel", "standardized")]
    print("| set-up | image AUROC of the score and of each component | blend weights chosen |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
