"""Every baseline trains a tiny configuration on synthetic phantoms in seconds and separates anomalies.

The bound: image AUROC >= 0.7 on 20 normal vs 20 anomalous test images. Under the null (scores unrelated to the
label) AUROC for 20 vs 20 has mean 0.5 and standard deviation sqrt((n0 + n1 + 1) / (12 n0 n1)) = 0.092, so 0.7 is
more than two standard deviations above chance: a model that learned nothing fails it about 1.5% of the time, and the
fixed seeds make each run deterministic. Pixel AUROC on the lesion masks is checked where the method localises.
"""

from __future__ import annotations

import functools

import pytest
import torch
from sklearn.metrics import roc_auc_score

from aeflow.data import Batch, collate, load_data
from aeflow.models import create_model

N_TEST = 20  # per class


@functools.lru_cache(maxsize=4)
def phantom_split(size: int, channels: int = 1) -> dict[str, torch.Tensor]:
    """The built-in synthetic brain phantoms: 64 normal training images, 20 normal + 20 lesion test images."""
    data = load_data("synthetic", None, image_size=size, channels=channels, size=size, n_train=64, n_val=0,
                     n_test=2 * N_TEST, difficulty=0.0, seed=0)
    train, test = collate(list(data.train)), collate(list(data.test))
    return {"train": train.image, "test": test.image, "label": test.label, "mask": test.mask}


def as_batch(images: torch.Tensor) -> Batch:
    n, _, h, w = images.shape
    return Batch(
        image=images,
        label=torch.zeros(n, dtype=torch.long),
        mask=torch.zeros(n, h, w),
        has_mask=torch.zeros(n, dtype=torch.bool),
        path=[f"phantom{i}" for i in range(n)],
        anomaly_type=["good"] * n,
    )


def train(model, images: torch.Tensor, *, steps: int, lr: float, batch_size: int = 16, seed: int = 0):
    """A few Adam steps (gradient models) or one fitting pass (memory banks); the lightning wrapper does the same."""
    torch.manual_seed(seed)
    loader = [as_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not model.trained_by_gradient:
        model.eval()
        model.fit(loader)
        return model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = loader[step % len(loader)]
        losses = model.loss(batch)
        assert torch.isfinite(losses["loss"]), f"non-finite loss at step {step}: {losses}"
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    model.eval()
    return model
