"""The thin lightning wrapper that trains any gradient-trained AnomalyModel.

Training minimises `model.loss(batch)["loss"]` on normal images. Validation never sees test labels. It logs the
same loss on the NORMAL validation images (`val_loss`) and, when the validation split also holds labelled
anomalies, the image AUROC of the model's score (`val_image_AUROC`) and of each score component
(`val_image_AUROC_<component>`). A model with a score calibration (AE-FLOW's `fit_calibration`) is calibrated
on each epoch's validation pass first, so `val_image_AUROC` is that of the score the epoch's weights would be
used with; AE-FLOW's per-position reference is fitted before that from a pass over the normal training images
with the epoch's weights (summed over the ranks under DDP, so every rank holds the same). Which of the two
selects the kept checkpoint is decided in aeflow.training.run (`selection_metric`).

Under DDP (several processes) training batches are sharded over the ranks and the logged training losses are
averaged over them (`sync_dist`), so the curve is that of the global batch. Validation is NOT sharded: every rank
scores the whole validation split (aeflow.training.distributed.WholeSplitSampler). The calibration, the blend
fit and the AUROC need every validation image's score together, and a sharded pass would need all of them
gathered, while torch's DistributedSampler also pads the shards with repeated images, which would count them
twice in AUROC and calibration; with the whole split on every rank each rank fits the same calibration and logs
the same metric, so the checkpoint and early-stopping decisions agree with no further communication. The cost:
validation takes as long as in one process (it is small next to training in every set-up here).
"""

from __future__ import annotations

import lightning as L
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from aeflow.data.sample import Batch
from aeflow.models.base import AnomalyModel
from aeflow.training.distributed import ShardSampler


class AnomalyModule(L.LightningModule):
    def __init__(self, model: AnomalyModel, lr: float, weight_decay: float, val_has_anomalies: bool = False):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_has_anomalies = val_has_anomalies
        self._val_scores: dict[str, list[torch.Tensor]] = {}
        self._val_labels: list[torch.Tensor] = []
        self._calibration = None

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        losses = self.model.loss(batch)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, prog_bar=True,
                      batch_size=len(batch), sync_dist=True)
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        normal = batch.label <= 0
        if normal.any():
            losses = self.model.loss(_select(batch, normal))
            self.log_dict({f"val_{k}": v for k, v in losses.items()}, on_epoch=True, prog_bar=True,
                          batch_size=int(normal.sum()), sync_dist=True)
        if not self.val_has_anomalies:
            return
        self._val_labels.append(batch.label.cpu())
        if self._calibration is not None:  # it keeps the components; the blend needs the whole epoch
            self._calibration.add(self.model.score_components(batch.image), batch.label)
            return
        parts = self.model.predict(batch.image)
        for name, value in parts.items():
            if name == "pred_score" or name.startswith("score_"):
                self._val_scores.setdefault(name, []).append(value.detach().float().cpu())

    def on_validation_epoch_start(self) -> None:
        # AE-FLOW's per-position reference, from the training images and this epoch's weights (each rank passes its
        # shard; the sums are all-reduced).
        if hasattr(self.model, "fit_reference") and not self.trainer.sanity_checking:
            with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws a seed: training stays as it was
                self.model.fit_reference(self._reference_loader(), all_reduce=True)
        fits_calibration = self.val_has_anomalies and hasattr(self.model, "fit_calibration")
        self._calibration = self.model.calibration_set() if fits_calibration else None

    def _reference_loader(self) -> DataLoader:
        """The training images once each, in order, this rank's share of them: a loader of its own, so that the
        pass takes nothing from the training loader's shuffle or sampler state."""
        train = self.trainer.train_dataloader
        batch_size = train.batch_size or getattr(train.batch_sampler, "batch_size", None) or 32
        return DataLoader(train.dataset, batch_size=batch_size, collate_fn=train.collate_fn,
                          sampler=ShardSampler(train.dataset, shuffle=False, pad=False))

    def on_validation_epoch_end(self) -> None:
        labels = torch.cat(self._val_labels) if self._val_labels else torch.empty(0)
        # Lightning's sanity check sees two batches: too few to calibrate on, and nothing is selected on it.
        if not self.trainer.sanity_checking and (labels == 0).sum() >= 2 and (labels == 1).any():
            if self._calibration is not None:
                self.model.fit_calibration(self._calibration)
                parts = {name: self._calibration.component(name).float() for name in self._calibration.scores}
                blended = self.model.blend({name: value.to(self.device) for name, value in parts.items()})
                self._val_scores = {"pred_score": [blended.float().cpu()], **{k: [v] for k, v in parts.items()}}
            for name, values in self._val_scores.items():
                auroc = float(roc_auc_score(labels.numpy(), torch.cat(values).numpy()))
                self.log("val_image_AUROC" if name == "pred_score" else f"val_image_AUROC_{name.removeprefix('score_')}",
                         auroc, sync_dist=True)
        self._val_scores, self._val_labels, self._calibration = {}, [], None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                    weight_decay=self.weight_decay)


def adam(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch's Adam for the gradient-trained models, fused (one kernel over all parameters instead of a loop of
    small ops per tensor) where torch has that kernel for them: floating-point tensors on the CPU or a CUDA GPU.
    The same update rule; the speed it gives is measured by benchmarks/vs_anomalib.py (aeflow's training step uses
    this function)."""
    fused = bool(parameters) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda")
                                     for p in parameters)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


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
