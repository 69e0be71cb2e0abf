"""Speed of two hot paths outside the model: synthetic phantom generation and the pixel metrics.

    python benchmarks/data_and_metrics.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from common import machine  # noqa: E402


def main() -> None:
    from aeflow.data import make_phantom
    from aeflow.evaluation.metrics import pixel_metrics

    print(f"machine: {machine()}")
    print("| what | size | seconds |")
    print("|---|---|---|")
    for size in (64, 128, 256):
        start = time.perf_counter()
        for index in range(50):
            make_phantom(7, 10_000 + index, size=size, anomaly="dark_lesion")
        print(f"| one synthetic phantom (uncached) | {size} px | {(time.perf_counter() - start) / 50:.4f} |")
    rng = np.random.default_rng(0)
    masks = np.zeros((200, 256, 256), np.uint8)
    for mask in masks[:100]:
        y, x = rng.integers(20, 236, 2)
        mask[y - 8:y + 8, x - 8:x + 8] = 1
    maps = ndimage.uniform_filter(masks.astype(np.float32), (1, 5, 5)) + rng.standard_normal(masks.shape,
                                                                                              dtype=np.float32) * 0.3
    start = time.perf_counter()
    pixel_metrics(maps, masks)
    print(f"| pixel AUROC + AUPRO + best Dice | 200 maps of 256 px | {time.perf_counter() - start:.2f} |")


if __name__ == "__main__":
    main()
