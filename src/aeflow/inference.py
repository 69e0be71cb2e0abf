"""Run a trained model over a data set and keep everything evaluation and reports need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aeflow.backends import Predictor, make_predictor
from aeflow.data.sample import collate
from aeflow.models.base import AnomalyModel


@dataclass
class Predictions:
    """Model outputs over one split, in data set order (numpy arrays, CPU)."""

    pred_score: np.ndarray  # N
    labels: np.ndarray  # N, 0 / 1 (-1 unknown)
    paths: list[str]
    anomaly_types: list[str]
    components: dict[str, np.ndarray] = field(default_factory=dict)  # score_<name> -> N
    anomaly_map: np.ndarray | None = None  # N x H x W (float32), kept only when asked
    masks: np.ndarray | None = None  # N x H x W (uint8); all zeros where has_mask is False
    has_mask: np.ndarray | None = None  # N, bool: pixel ground truth known for this image
    images: np.ndarray | None = None  # N x C x H x W (float32), kept only when asked
    reconstruction: np.ndarray | None = None  # N x C x H x W where the model reconstructs
    backend: dict | None = None  # which inference backend scored them, and why (aeflow.backends)

    def __len__(self) -> int:
        return len(self.pred_score)


@torch.no_grad()
def predict_dataset(
    model: AnomalyModel,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    keep_maps: bool = True,
    keep_images: bool = False,
    num_workers: int = 0,
    backend: str = "auto",
    predictor: Predictor | None = None,
) -> Predictions:
    """Score every sample of `dataset`; the model is put in eval mode on `device`.

    backend: how predict runs (aeflow.backends: "auto" measures the candidates on the first batch's image shape;
        "eager" is plain PyTorch). predictor: one already built for this model, used as it is (saves building it
        again for every call).
    """
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    scores, labels, paths, types = [], [], [], []
    components: dict[str, list] = {}
    maps, masks, has_mask, images, recons = [], [], [], [], []
    for batch in loader:
        if predictor is None:
            predictor = make_predictor(model, tuple(batch.image.shape[1:]), backend=backend, batch_size=batch_size,
                                       device=device)
        out = predictor(batch.image.to(device))
        scores.append(out["pred_score"].float().cpu())
        for key, value in out.items():
            if key.startswith("score_"):
                components.setdefault(key, []).append(value.float().cpu())
        labels.append(batch.label)
        paths += batch.path
        types += batch.anomaly_type
        masks.append(batch.mask.to(torch.uint8))
        has_mask.append(batch.has_mask)
        if keep_maps:
            maps.append(out["anomaly_map"].float().cpu())
        if keep_images:
            images.append(batch.image)
            if "reconstruction" in out:
                recons.append(out["reconstruction"].float().cpu())
    if not scores:
        return Predictions(np.zeros(0, np.float32), np.zeros(0, np.int64), [], [])
    known = torch.cat(has_mask)
    return Predictions(
        pred_score=torch.cat(scores).numpy(),
        labels=torch.cat(labels).numpy(),
        paths=paths,
        anomaly_types=types,
        components={k: torch.cat(v).numpy() for k, v in components.items()},
        anomaly_map=torch.cat(maps).numpy() if keep_maps else None,
        masks=torch.cat(masks).numpy() if bool(known.any()) else None,
        has_mask=known.numpy() if bool(known.any()) else None,
        images=torch.cat(images).numpy() if keep_images else None,
        reconstruction=torch.cat(recons).numpy() if recons else None,
        backend=predictor.report,
    )
