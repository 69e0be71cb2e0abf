"""DifferNet: same same but DifferNet, semi-supervised defect detection with normalizing flows (Rudolph et al.,
WACV 2021, arXiv:2008.12577).

The image is fed to a frozen ImageNet backbone at three resolutions (full, 1/2, 1/4); each output is average-pooled
over space and the three vectors are concatenated into one descriptor of the whole image. A fully-connected
normalizing flow (FrEIA AllInOneBlocks on vectors, MLP coupling networks, 8 steps, clamp 3 as in the paper) maps
the descriptors of normal images to a standard normal by maximum likelihood. The image score is the mean over
several transformed versions of the image of -log p_Z(z) (the paper's score: the Gaussian term only, per
dimension here). The anomaly map is the paper's gradient map: |d score / d image|, maximum over channels,
Gaussian-smoothed.

Choices of this implementation:
- Transformations: the paper trains and tests with random rotations and brightness / contrast / saturation
  changes (64 versions at test). Here they are the 8 rotations by multiples of 90 degrees with and without a
  horizontal flip (the dihedral group), deterministic at test; training applies one of them at random per batch.
- The backbone is one of aeflow.nn.backbones (the paper used AlexNet), read at its stride-16 output; each
  resolution is rounded to a multiple of 16 (at least 16), the size the backbones accept.
- The coupling network is CFlow's (in -> 2 * in -> out), and the flow starts with an ActNorm initialised from the
  first batch, for the same reason as there: pooled backbone features are far from unit scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.cflow import vector_flow
from aeflow.nn.backbones import create_backbone
from aeflow.nn.blocks import gaussian_blur

N_DIHEDRAL = 8


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of the dihedral group: rotation by (k mod 4) * 90 degrees, then a flip if k >= 4.
    k = 0 is the identity."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


@register("differnet")
class DifferNet(AnomalyModel):
    """DifferNet over a frozen `backbone`; `scales` are the image resolutions (fractions of the input),
    `test_transforms` how many dihedral versions (1..8, the identity first) are averaged into the score, and
    `blur_sigma` the smoothing of the gradient map in pixels."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        scales: tuple[float, ...] = (1.0, 0.5, 0.25),
        flow_steps: int = 8,
        clamp: float = 3.0,
        test_transforms: int = N_DIHEDRAL,
        blur_sigma: float = 4.0,
    ):
        super().__init__()
        if not 1 <= test_transforms <= N_DIHEDRAL:
            raise ConfigError(f"test_transforms must be in 1..{N_DIHEDRAL}, got {test_transforms}")
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ConfigError(f"scales must be fractions in (0, 1], got {scales}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, frozen=True)
        self.flow = vector_flow(len(scales) * self.backbone.out_channels, flow_steps, clamp)

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """B x (len(scales) * C): the pooled backbone features at every resolution, concatenated."""
        pooled = []
        for scale in self._config["scales"]:
            size = [max(16, round(scale * s / 16) * 16) for s in images.shape[-2:]]
            x = images if list(images.shape[-2:]) == size else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=True)
            pooled.append(self.backbone(x).mean((-2, -1)))
        return torch.cat(pooled, 1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        k = int(torch.randint(N_DIHEDRAL, ()))
        with torch.no_grad():
            x = self.descriptor(dihedral(batch.image, k))
        z, log_det = self.flow(x)
        return {"loss": ((0.5 * z.pow(2).sum(1) - log_det) / x.shape[1]).mean()}

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) mean over the test transformations of -log p_Z(z) per dimension (without the constant)."""
        per_transform = [
            0.5 * self.flow(self.descriptor(dihedral(images, k)))[0].pow(2).mean(1)
            for k in range(self._config["test_transforms"])
        ]
        return torch.stack(per_transform).mean(0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradient map needs autograd: it leaves inference mode (lightning's test loop enables it) and
        no_grad on a fresh copy of the input."""
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone().requires_grad_(True)
            score = self.score(x)
            (grad,) = torch.autograd.grad(score.sum(), x)
        anomaly_map = gaussian_blur(grad.abs().amax(1), self._config["blur_sigma"])
        return {"pred_score": score.detach(), "anomaly_map": anomaly_map}

