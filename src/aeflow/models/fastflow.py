"""FastFlow: unsupervised anomaly detection and localization via 2D normalizing flows (Yu et al., 2021,
arXiv:2111.07677).

A frozen ImageNet backbone gives feature maps at strides 4, 8 and 16. Each is layer-normalised and mapped by its
own 2D normalizing flow (8 steps of affine coupling with convolutional sub-networks, so the flow keeps the spatial
layout) to a standard normal variable z; training maximises the likelihood of normal images' features. At test
time a position whose z is unlikely is anomalous: each scale's map is 1 - exp(mean over channels of -z^2 / 2), the
anomaly map is their mean after up-sampling to the image, and the image score its maximum.

Deviation from the paper: its LayerNorm over (C, h, w) has an affine weight per element, which ties the model to
one input size; here GroupNorm with one group normalises over the same (C, h, w) with a per-channel affine, so
one model serves any size. The flow steps are those of AE-FLOW's bottleneck (aeflow.nn.flow, FrEIA's
AllInOneBlock with FastFlow's 3x3 conv -> ReLU -> 1x1 conv coupling network).

The norm's per-channel affine scale is part of the density model: its log-determinant (h * w * sum log|weight| per
image) is added to the flow's. Without it the loss is not a likelihood and training can lower it without learning
anything, by shrinking the scale towards zero (measured: the weights fell from 1 to ~0.005 in 300 steps, the loss to
-3.4 per value, and the anomaly map became uninformative).

Status: on the 128 px synthetic phantoms with EfficientNet-Lite0, 4 flow steps and 100 Adam steps, image AUROC
0.78-0.91 and pixel AUROC 0.94 over three seeds (tests/models/test_baselines.py). On real data see
docs/results/leaderboard_*.md (PneumoniaMNIST and magnetic tiles, 3 seeds each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages
from aeflow.nn.flow import FlowBottleneck


@register("fastflow")
class FastFlow(AnomalyModel):
    """FastFlow over a frozen `backbone` (see aeflow.nn.backbones); the paper: 8 flow steps, hidden ratio 1.0
    for ResNets, affine clamp 2.0. The loss is the negative log-likelihood per feature value, so that its size
    does not depend on the image size or the backbone."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
    ):
        super().__init__()
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        channels = self.features.out_channels
        self.norms = nn.ModuleList(nn.GroupNorm(1, c) for c in channels)
        self.flows = nn.ModuleList(
            FlowBottleneck(c, steps=flow_steps, subnet="conv", hidden_ratio=hidden_ratio, clamp=clamp)
            for c in channels
        )

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det dz/df^|) per scale, f^ the features normalised without the norm's affine."""
        with torch.no_grad():
            stages = self.features(images)
        out = []
        for f, norm, flow in zip(stages, self.norms, self.flows):
            z, log_det = flow(norm(f))
            # The norm's per-channel scale is the flow's first layer: without its log-determinant, training lowers
            # the loss by shrinking that scale towards zero (the flow is then rewarded for expanding the collapsed
            # features) instead of learning the features' density.
            out.append((z, log_det + f[0, 0].numel() * norm.weight.abs().log().sum()))
        return out

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        per_scale = [
            (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean() / z[0].numel() for z, log_det in self(batch.image)
        ]
        return {"loss": sum(per_scale) / len(per_scale)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = []
        for z, _ in self(images):
            likelihood = torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True))
            maps.append(F.interpolate(1 - likelihood, size=images.shape[-2:], mode="bilinear", align_corners=False))
        anomaly_map = torch.stack(maps).mean(0).squeeze(1)
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}

