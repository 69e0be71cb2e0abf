"""The one sample type of the toolkit, and the batch that collates it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One image as every part of aeflow sees it.

    image: float tensor C x H x W (grayscale stays single-channel).
    label: 0 normal, 1 anomalous (-1 unknown, e.g. at prediction time).
    mask: float tensor H x W with values in {0, 1}, or None where no pixel ground truth exists.
    path: where the image came from ("file.nii.gz#z=12" style suffix for slices and frames).
    anomaly_type: e.g. "good", "crack", "pneumonia"; used for per-type results.
    meta: anything else a report needs (original size, intensity rule, DICOM tags...).
    """

    image: torch.Tensor
    label: int
    path: str
    mask: torch.Tensor | None = None
    anomaly_type: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    """Samples stacked along dimension 0; `mask` is all zeros where `has_mask` is False."""

    image: torch.Tensor  # B x C x H x W
    label: torch.Tensor  # B, long
    mask: torch.Tensor  # B x H x W
    has_mask: torch.Tensor  # B, bool
    path: list[str]
    anomaly_type: list[str]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.image.to(device, non_blocking=non_blocking),
            self.label.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            self.has_mask.to(device, non_blocking=non_blocking),
            self.path,
            self.anomaly_type,
        )

    def __len__(self) -> int:
        return self.image.shape[0]


def collate(samples: list[Sample]) -> Batch:
    images = torch.stack([s.image for s in samples])
    h, w = images.shape[-2:]
    masks = torch.stack([s.mask if s.mask is not None else torch.zeros(h, w) for s in samples])
    return Batch(
        image=images,
        label=torch.tensor([s.label for s in samples], dtype=torch.long),
        mask=masks.float(),
        has_mask=torch.tensor([s.mask is not None for s in samples]),
        path=[s.path for s in samples],
        anomaly_type=[s.anomaly_type for s in samples],
    )
