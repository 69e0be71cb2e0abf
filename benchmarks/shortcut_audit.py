"""The shortcut audit of `aeflow test` (aeflow.evaluation.shortcuts) on a data set, without a model: the test
AUROC of each trivial image statistic, its direction chosen on the validation split, and which one validation
picks as the best.

    OMP_NUM_THREADS=1 python benchmarks/shortcut_audit.py --data medmnist \
        --root ../shared/data/pneumoniamnist/pneumoniamnist.npz --image-size 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from aeflow.data import load_data  # noqa: E402
from aeflow.evaluation.shortcuts import audit, dataset_statistics, feature_knn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="medmnist")
    parser.add_argument("--root", required=True)
    parser.add_argument("--image-size", type=int, default=64, help="0 keeps the native size")
    parser.add_argument("--intensity", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn", action="store_true", help="add the 1-NN distance on pooled EfficientNet-Lite0 "
                                                             "features (as aeflow test --knn-audit)")
    args = parser.parse_args()
    data = load_data(args.data, args.root, image_size=args.image_size or None, seed=args.seed,
                     intensity=args.intensity)
    detectors = {}
    if args.knn:
        if args.image_size % 16:
            parser.error("--knn needs an --image-size that is a multiple of 16")
        detectors["knn_features"] = ("farther from the nearest training normal = anomalous",
                                     *feature_knn(data.train, data.val, data.test, seed=args.seed))
    result = audit(dataset_statistics(data.val), data.val.labels, dataset_statistics(data.test), data.test.labels,
                   None, detectors=detectors)
    print(f"machine: {machine()}")
    print(f"data: {args.data} {args.root}, {args.image_size} px, intensity {args.intensity}, seed {args.seed}; "
          f"validation {int((data.val.labels == 0).sum())} normal / {int((data.val.labels == 1).sum())} anomalous, "
          f"test {int((data.test.labels == 0).sum())} / {int((data.test.labels == 1).sum())}")
    print(f"mode: {result['mode']}")
    print("| statistic | direction (chosen on validation) | validation AUROC | test AUROC |")
    print("|---|---|---|---|")
    for name, entry in result["statistics"].items():
        val = "n/a" if entry["val_AUROC"] is None else f"{entry['val_AUROC']:.3f}"
        test = "n/a" if entry["test_AUROC"] is None else f"{entry['test_AUROC']:.3f}"
        print(f"| {name} | {entry['direction']} | {val} | {test} |")
    print(f"skipped (constant or undefined on validation): {', '.join(result['skipped']) or 'none'}")
    print(f"best on validation: {result['best']}")


if __name__ == "__main__":
    main()
