"""The thin lightning wrapper that trains any gradient-trained AnomalyModel.

Training minimises `model.loss(batch)["loss"]` on normal images. Validation needs no test labels: its signal
is the same loss on the NORMAL validation images (`val_loss`, what early stopping and the "best" checkpoint
follow). When the validation split also holds anomalies, the image AUROC of each score component
(`val_image_AUROC_<component>`) is logged for the curves, but nothing is selected on it by default: a
normal-only validation split is the common case and the default must work there.
"""

from __future__ import annotations

import lightning as L
import torch
from sklearn.metrics import roc_auc_score

from aeflow.data.sample import Batch
from aeflow.models.base import AnomalyModel


class AnomalyModule(L.LightningModule):
    def __init__(self, model: AnomalyModel, lr: float, weight_decay: float, val_has_anomalies: bool = False):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_has_anomalies = val_has_anomalies
        self._val_scores: dict[str, list[torch.Tensor]] = {}
        self._val_labels: list[torch.Tensor] = []

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        losses = self.model.loss(batch)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, prog_bar=True,
                      batch_size=len(batch))
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        normal = batch.label <= 0
        if normal.any():
            losses = self.model.loss(_select(batch, normal))
            self.log_dict({f"val_{k}": v for k, v in losses.items()}, on_epoch=True, prog_bar=True,
                          batch_size=int(normal.sum()))
        if not self.val_has_anomalies:
            return
        # Components only: a blend that needs calibration (AE-FLOW's standardized score) has none yet.
        scores = getattr(self.model, "score_components", self.model.predict)(batch.image)
        for name, value in scores.items():
            if name.startswith("score_"):
                self._val_scores.setdefault(name, []).append(value.detach().float().cpu())
        self._val_labels.append(batch.label.cpu())

    def on_validation_epoch_end(self) -> None:
        labels = torch.cat(self._val_labels) if self._val_labels else torch.empty(0)
        if len(labels) and labels.min() == 0 and labels.max() == 1:
            for name, values in self._val_scores.items():
                auroc = roc_auc_score(labels.numpy(), torch.cat(values).numpy())
                self.log(f"val_image_AUROC_{name.removeprefix('score_')}", float(auroc))
        self._val_scores, self._val_labels = {}, []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.lr, weight_decay=self.weight_decay)


def _select(batch: Batch, keep: torch.Tensor) -> Batch:
    index = keep.nonzero().flatten().tolist()
    return Batch(
        image=batch.image[keep],
        label=batch.label[keep],
        mask=batch.mask[keep],
        has_mask=batch.has_mask[keep],
        path=[batch.path[i] for i in index],
        anomaly_type=[batch.anomaly_type[i] for i in index],
    )
