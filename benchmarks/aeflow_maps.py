"""Where AE-FLOW's pixel map gets its AUROC: each reference stage's map alone, their sum (the default map), each
stage divided by its channel count, and the reconstruction residual, each at 0.5x / 1x / 2x the default smoothing.

    python benchmarks/aeflow_maps.py runs/leaderboard_magnetic_tile_aeflow_reference/aeflow-s0

A diagnostic of a trained run on its own test split (pixel AUROC needs the test masks): it informs what to try
next, it chooses nothing. Needs a run trained with the per-position reference (reference="position").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from aeflow.data import DataSplits, load_splits
from aeflow.data.sample import collate
from aeflow.nn.blocks import gaussian_blur
from aeflow.training import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, config = load_run(args.run)
    model.eval()
    if not model.reference_fitted:
        parser.error(f"{args.run}: not an AE-FLOW run with a fitted per-position reference")
    train = config["train"]
    splits = DataSplits.from_records(load_splits(args.run), image_size=train["image_size"], channels=train["channels"],
                                     intensity=train.get("data", {}).get("intensity", "auto"), validate=False)
    loader = torch.utils.data.DataLoader(splits.test, batch_size=32, collate_fn=collate)
    maps: dict[str, list[np.ndarray]] = {}
    masks = []
    with torch.no_grad():
        for batch in loader:
            x = batch.image.float()
            latents, x_rec = model.flow_and_reconstruction(x)
            distances = model._reference_distances([z for z, _ in latents])
            up = [F.interpolate(d[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                  for d in distances]
            channels = [getattr(model, f"reference_index{i}").numel() for i in range(len(up))]
            strides = [x.shape[-1] // d.shape[-1] for d in distances]
            variants = {"sum of stages (default)": sum(up),
                        **{f"stride {s} alone": u for s, u in zip(strides, up)},
                        "stages / channel count": sum(u / c for u, c in zip(up, channels)),
                        "reconstruction residual": (x - x_rec).abs().mean(1)}
            sigma = 4.0 * x.shape[-1] / 256  # the model's own smoothing
            for name, value in variants.items():
                for factor in (0.5, 1.0, 2.0):
                    maps.setdefault(f"{name}, smoothing x{factor:g}", []).append(
                        gaussian_blur(value, sigma * factor).numpy())
            masks.append(batch.mask.numpy())
    truth = np.concatenate(masks).reshape(-1) > 0.5
    print(f"{args.run}: {len(np.concatenate(masks))} test images, pixel AUROC per map")
    print("| map | pixel AUROC |\n|---|---|")
    for name, values in maps.items():
        print(f"| {name} | {roc_auc_score(truth, np.concatenate(values).reshape(-1)):.4f} |")


if __name__ == "__main__":
    main()
