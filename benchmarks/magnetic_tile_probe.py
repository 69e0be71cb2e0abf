"""How much the image shape alone tells on the magnetic-tile set, where images of varying aspect ratio are resized
to squares for every model.

Prints the 5th/50th/95th percentile of width / height per class and the AUROC (every defect image against every
normal image) of an unsupervised shape score: |log(aspect / median aspect of the normal images)|. A model that
picked up the squashing could reach this AUROC without looking at a defect.

    python benchmarks/magnetic_tile_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic_tile"


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    if not root.is_dir():
        sys.exit(f"magnetic tile data not found at {root}")
    aspects = {}
    for folder in sorted(root.glob("MT_*")):
        sizes = [Image.open(path).size for path in sorted((folder / "Imgs").glob("*.jpg"))]
        aspects[folder.name] = np.array([w / h for w, h in sizes])
    print("| class | images | aspect p5 | p50 | p95 |\n|---|---|---|---|---|")
    for name, values in aspects.items():
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        print(f"| {name} | {len(values)} | {p5:.2f} | {p50:.2f} | {p95:.2f} |")
    normal = aspects.pop("MT_Free")
    defects = np.concatenate(list(aspects.values()))
    score = np.abs(np.log(np.r_[normal, defects] / np.median(normal)))
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defects))]
    print(f"\nAUROC of |log(aspect / median normal aspect)|: {roc_auc_score(labels, score):.3f}")


if __name__ == "__main__":
    main()
