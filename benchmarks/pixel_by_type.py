"""Pixel AUROC per anomaly type, and what each type leaves of the whole: for any trained run with test masks.

    python benchmarks/pixel_by_type.py runs/tile_default/aeflow-s0 runs/tile_fb/knn-s0 runs/tile_fb/padim-s0

Per run (the model's own anomaly map, as `aeflow test` scores it, eager backend), one row per anomaly type:
- share: the type's part of all anomalous test pixels (pixel AUROC weighs every pixel alike, so a type with
  large masks decides it);
- AUROC vs normal pixels: the type's anomalous pixels against every normal pixel of the test split (the
  normal pixels of anomalous images included, as in the pixel AUROC itself);
- ceiling: the pixel AUROC if every anomalous pixel of the OTHER types scored above every pixel of the split,
  with this type's pixels and all normal pixels left as they are: how far the whole can go while this type is
  scored as it is.

--position-gaussian (AE-FLOW runs only): before scoring, the run's reference is re-fitted as reference="position"
(a Gaussian of z' per position, AE-FLOW's own `fit_reference` on the run's training split), so the map is that of
a position-aware reference of the same trained flow; the image score is then not the run's.

A diagnostic on the test split (masks are only there): it explains a number, it chooses nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from aeflow.data import DataSplits, load_splits
from aeflow.data.sample import collate
from aeflow.evaluation.metrics import pixel_metrics
from aeflow.inference import predict_dataset
from aeflow.training import load_run


def rows(run: str, position_gaussian: bool = False) -> list[tuple[str, int, float, float, float]]:
    model, config = load_run(run)
    train = config["train"]
    splits = DataSplits.from_records(load_splits(run), image_size=train["image_size"], channels=train["channels"],
                                     intensity=train.get("data", {}).get("intensity", "auto"), validate=False)
    if position_gaussian:
        if not getattr(model, "n_stages", 0):
            raise SystemExit(f"{run}: --position-gaussian needs an AE-FLOW run with a reference")
        model.reference = "position"
        model.fit_reference(torch.utils.data.DataLoader(splits.train, batch_size=32, collate_fn=collate))
    predictions = predict_dataset(model, splits.test, backend="eager")
    keep = predictions.has_mask
    maps, masks = predictions.anomaly_map[keep], predictions.masks[keep].astype(bool)
    types = np.asarray(predictions.anomaly_types)[keep]
    normal = np.sort(maps[~masks])
    out = []
    for name in sorted({t for t, m in zip(types, masks) if m.any()}):
        mine = (types == name)[:, None, None] & masks
        scores = maps[mine]
        # AUROC of this type's pixels against all normal pixels, ties counted half
        below = np.searchsorted(normal, scores, side="left")
        ties = np.searchsorted(normal, scores, side="right") - below
        auroc = float((below + 0.5 * ties).mean() / len(normal))
        lifted = maps.copy()
        lifted[masks & ~mine] = maps.max() + 1.0
        ceiling = pixel_metrics(lifted, masks)["pixel_AUROC"]
        out.append((name, int((types == name).sum()), float(mine.sum() / masks.sum()), auroc, ceiling))
    whole = pixel_metrics(maps, masks)["pixel_AUROC"]
    out.append(("all", int(len(types)), 1.0, float(whole), float("nan")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position-gaussian", action="store_true",
                        help="AE-FLOW: map from per-position Gaussians of z' re-fitted on the training split")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | anomaly type | test images | share of anomalous pixels | AUROC vs normal pixels | ceiling |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        for name, n, share, auroc, ceiling in rows(run, args.position_gaussian):
            if name == "all":
                print(f"| {run} | all (pixel AUROC) | {n} | 1 | {auroc:.3f} | - |", flush=True)
            else:
                print(f"| {run} | {name} | {n} | {share:.3f} | {auroc:.3f} | {ceiling:.3f} |", flush=True)


if __name__ == "__main__":
    main()
