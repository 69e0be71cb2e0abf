"""CS-Flow: fully convolutional cross-scale normalizing flows for defect detection (Rudolph, Wehrbein, Rosenhahn and
Wandt, WACV 2022, arXiv:2110.02855).

- Features at three scales from a frozen ImageNet backbone. The paper feeds the image at three resolutions
  (768, 384 and 192 px) to EfficientNet-B5 and reads one layer (stride 32, 304 channels), giving 24 x 24, 12 x 12
  and 6 x 6 maps. Here the three scales are three stages of one pass, EfficientNet-Lite0 at strides 4, 8 and 16
  (24, 40 and 112 channels; aeflow.nn.blocks.FeatureStages): the same factor-2 pyramid of map sizes, without three
  backbone passes. Why: at the boards' 64 px, the paper's scheme with a stride-16 trunk would give 4 x 4, 2 x 2 and
  1 x 1 maps, too coarse to place anything; stages give 16 x 16, 8 x 8 and 4 x 4. The scales then differ in
  channels as well as in size, so every cross-scale convolution maps between the two scales' channel counts.
- Each scale passes an ActNorm (aeflow.nn.flow.ActNorm2d, per-channel standardisation from the first training batch,
  then trained; its log-determinant is counted). The paper has none; the EfficientNet-B5 features it reads are of
  one layer, where Lite0's three stages have different ranges and the couplings should not spend training on that.
- A fully convolutional flow over the three maps jointly: `coupling_blocks` (paper: 4) blocks, each a fixed random
  channel permutation per scale followed by a cross-scale affine coupling. The coupling is GLOW's two-sided one
  applied to the three scales in parallel: each map is split into halves (x_1, x_2); the second halves of ALL scales
  go through one cross-convolution block that returns (s, t) for the first halves of all scales,
  y_1 = x_1 * exp(c(s)) + t; then the y_1 of all scales give (s, t) for the x_2. c(s) = clamp * 0.636 * atan(s /
  clamp) is the soft clamp (paper: clamp 3).
- The cross-convolution block: per scale a conv -> leaky ReLU (slope 0.1) to `hidden_channels`,
  then each scale's output is the sum of a conv of its own hidden map, a conv of the next coarser scale's hidden map
  up-sampled (nearest) to its size, and a stride-2 conv of the next finer scale's hidden map; each scale's sum is
  multiplied by a learned factor that starts at zero (so every coupling starts as the identity). Kernel 3 x 3;
  the paper uses 1024 hidden channels for its 304-channel features, the default here is 256 for Lite0's 24-112.
- Loss: the negative log-likelihood of all scales jointly under a standard normal latent, 0.5 ||z||^2 -
  log|det J| summed over the three scales, divided by the number of latent dimensions (as the authors' code does),
  averaged over the batch.
- Image score (paper): the mean of z^2 over every dimension of every scale, which is ||z||^2 of the whole latent
  divided by its size. Anomaly map: the mean over channels of z^2 at each position of the FINEST scale (stride 4),
  up-sampled bilinearly to the image; the coarser scales take part in the score only.

Other departures: the authors' image sizes, training length and EfficientNet-B5 are replaced by the boards'
settings (EfficientNet-B5 weights are not available offline).

Status: on the 96 px synthetic phantoms, 2 blocks, 32 hidden channels and 60 Adam steps, image AUROC 0.86-0.88 and
pixel AUROC 0.86 (tests/models/test_glow_csflow.py). On the boards (64 px, 4 epochs, 64 hidden channels;
docs/results/rows_flows.md): magnetic tiles 0.926 +- 0.012 image AUROC (pixel AUROC 0.62: the stride-4 map at 64 px
is 16 x 16 against defects covering ~0.5% of the image); PneumoniaMNIST 0.815 +- 0.019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages
from aeflow.nn.flow import ActNorm2d

SCALES = 3


class CrossConvolutions(nn.Module):
    """The coupling sub-network: three maps (finest first, each half the size of the previous) -> three maps of
    coefficients, each scale informed by its neighbours."""

    def __init__(self, channels_in: list[int], channels_out: list[int], hidden: int, kernel_size: int = 3,
                 leaky_slope: float = 0.1):
        super().__init__()
        pad = kernel_size // 2
        self.hidden = nn.ModuleList(nn.Conv2d(c, hidden, kernel_size, padding=pad) for c in channels_in)
        self.same = nn.ModuleList(nn.Conv2d(hidden, c, kernel_size, padding=pad) for c in channels_out)
        # up[i]: scale i + 1 -> scale i; down[i]: scale i -> scale i + 1.
        self.up = nn.ModuleList(nn.Conv2d(hidden, c, kernel_size, padding=pad) for c in channels_out[:-1])
        self.down = nn.ModuleList(nn.Conv2d(hidden, c, kernel_size, padding=pad, stride=2) for c in channels_out[1:])
        self.gamma = nn.Parameter(torch.zeros(len(channels_in)))
        self.leaky_slope = leaky_slope

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.hidden, xs)]
        out = []
        for i, h in enumerate(hidden):
            y = self.same[i](h)
            if i + 1 < len(hidden):
                y = y + self.up[i](F.interpolate(hidden[i + 1], size=h.shape[-2:], mode="nearest"))
            if i > 0:
                y = y + self.down[i - 1](hidden[i - 1])
            out.append(y * self.gamma[i])
        return out


class CrossScaleCoupling(nn.Module):
    """GLOW's affine coupling on the three scales at once; every affine coefficient of one scale depends on all three.

    forward returns (ys, log|det| per position of each scale, B x h_i x w_i)."""

    def __init__(self, channels: list[int], hidden: int, clamp: float, kernel_size: int = 3):
        super().__init__()
        self.first = [c // 2 for c in channels]
        second = [c - f for c, f in zip(channels, self.first)]
        self.net_for_first = CrossConvolutions(second, [2 * f for f in self.first], hidden, kernel_size)
        self.net_for_second = CrossConvolutions(self.first, [2 * s for s in second], hidden, kernel_size)
        self.clamp = clamp

    def _log_scale(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * (2 / math.pi) * torch.atan(s / self.clamp)

    def _affine(self, net: CrossConvolutions, conditions: list[torch.Tensor]):
        return [(self._log_scale(s), t) for s, t in (a.chunk(2, dim=1) for a in net(conditions))]

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        halves = [(x[:, :f], x[:, f:]) for x, f in zip(xs, self.first)]
        coefficients = self._affine(self.net_for_first, [x2 for _, x2 in halves])
        y1 = [x1 * log_s.exp() + t for (x1, _), (log_s, t) in zip(halves, coefficients)]
        log_dets = [log_s.sum(1) for log_s, _ in coefficients]
        coefficients = self._affine(self.net_for_second, y1)
        y2 = [x2 * log_s.exp() + t for (_, x2), (log_s, t) in zip(halves, coefficients)]
        log_dets = [d + log_s.sum(1) for d, (log_s, _) in zip(log_dets, coefficients)]
        return [torch.cat(pair, 1) for pair in zip(y1, y2)], log_dets

    def inverse(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        halves = [(y[:, :f], y[:, f:]) for y, f in zip(ys, self.first)]
        coefficients = self._affine(self.net_for_second, [y1 for y1, _ in halves])
        x2 = [(y2 - t) * torch.exp(-log_s) for (_, y2), (log_s, t) in zip(halves, coefficients)]
        coefficients = self._affine(self.net_for_first, x2)
        x1 = [(y1 - t) * torch.exp(-log_s) for (y1, _), (log_s, t) in zip(halves, coefficients)]
        return [torch.cat(pair, 1) for pair in zip(x1, x2)]


class CrossScaleFlow(nn.Module):
    """ActNorm per scale, then `blocks` x (fixed random channel permutation per scale -> cross-scale coupling).

    forward(three maps) -> (three latent maps, log|det| per image); the permutations are buffers drawn from torch's
    generator, so a flow rebuilt from its config and state dict is the same flow."""

    def __init__(self, channels: list[int], blocks: int, hidden: int, clamp: float, kernel_size: int = 3):
        super().__init__()
        self.norms = nn.ModuleList(ActNorm2d(c) for c in channels)
        self.couplings = nn.ModuleList(CrossScaleCoupling(channels, hidden, clamp, kernel_size) for _ in range(blocks))
        for b in range(blocks):
            for i, c in enumerate(channels):
                self.register_buffer(f"permutation_{b}_{i}", torch.randperm(c))

    def _permutations(self, block: int) -> list[torch.Tensor]:
        return [getattr(self, f"permutation_{block}_{i}") for i in range(len(self.norms))]

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        log_det = 0
        normalised = []
        for norm, x in zip(self.norms, xs):
            y, norm_log_det = norm(x)
            normalised.append(y)
            log_det = log_det + norm_log_det.flatten(1).sum(1)
        xs = normalised
        for block, coupling in enumerate(self.couplings):
            xs = [x[:, p] for x, p in zip(xs, self._permutations(block))]
            xs, log_dets = coupling(xs)
            log_det = log_det + sum(d.flatten(1).sum(1) for d in log_dets)
        return xs, log_det

    def inverse(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in reversed(range(len(self.couplings))):
            zs = self.couplings[block].inverse(zs)
            zs = [z[:, torch.argsort(p)] for z, p in zip(zs, self._permutations(block))]
        return [norm.inverse(z) for norm, z in zip(self.norms, zs)]


@register("csflow")
class CSFlow(AnomalyModel):
    """CS-Flow over the stride-4, -8 and -16 stages of a frozen `backbone` (see aeflow.nn.backbones)."""

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        weights: str | None = None,
        coupling_blocks: int = 4,
        hidden_channels: int = 256,
        clamp: float = 3.0,
        kernel_size: int = 3,
    ):
        super().__init__()
        if coupling_blocks < 1:
            raise ConfigError(f"csflow coupling_blocks must be >= 1, got {coupling_blocks}")
        if hidden_channels < 1:
            raise ConfigError(f"csflow hidden_channels must be >= 1, got {hidden_channels}")
        if clamp <= 0:
            raise ConfigError(f"csflow clamp must be > 0, got {clamp}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"csflow kernel_size must be odd and >= 1, got {kernel_size}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.flow = CrossScaleFlow(self.features.out_channels, coupling_blocks, hidden_channels, clamp, kernel_size)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (latents of the three scales, finest first; log|det| of the flow per image)."""
        with torch.no_grad():
            stages = self.features(images)
        return self.flow(stages)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        zs, log_det = self(batch.image)
        squared = sum(z.pow(2).flatten(1).sum(1) for z in zs)
        dims = sum(z[0].numel() for z in zs)
        return {"loss": ((0.5 * squared - log_det) / dims).mean()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        zs, _ = self(images)
        squared = sum(z.pow(2).flatten(1).sum(1) for z in zs)
        dims = sum(z[0].numel() for z in zs)
        finest = zs[0].pow(2).mean(1, keepdim=True)
        anomaly_map = F.interpolate(finest, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"pred_score": squared / dims, "anomaly_map": anomaly_map}
