"""CFlow-AD: real-time unsupervised anomaly detection with localization via conditional normalizing flows
(Gudovskiy et al., WACV 2022, arXiv:2107.12571).

A frozen ImageNet backbone gives feature maps at strides 4, 8 and 16. Every position of every map is one sample:
its C-dimensional feature vector goes through that scale's normalizing flow, a chain of affine couplings on
vectors whose coupling networks also see a 2D sinusoidal encoding of the position (the condition). The flow is
trained by maximum likelihood on randomly subsampled positions of normal images, so it learns the density of
normal features *at each place* of the image. At test time the per-dimension log-likelihood of every position is
turned into a likelihood (exp), up-sampled to the image, summed over the scales and negated: unlikely positions
give high anomaly values. The image score is the map's maximum.

Choices of this implementation:
- The paper subtracts the maximum log-likelihood over the whole test set before the exp. That multiplies each
  scale's likelihood map by its own constant, so it changes how the scales are weighted in the sum, and it makes
  one image's score depend on the other test images. Here the per-dimension log-likelihood (which stays in a safe
  range for exp) is used directly: every scale is weighted by its own likelihood, with no test-set statistic.
- Each flow starts with FrEIA's ActNorm (std floored at 1e-3), initialised from the first batch it sees: backbone features are far
  from unit scale, and the couplings should not spend their training absorbing that.
- Coupling steps are FrEIA's AllInOneBlock (as aeflow.nn.flow.PermutationStep: the same step, the permutation by
  indexing) with the paper's MLP (in -> 2 * in -> out, ReLU) coupling network,
  clamp 1.9, and a fixed random channel permutation after each step (the authors use a soft, i.e. random
  orthogonal, one; FrEIA warns that it is very slow to build for hundreds of channels).
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages
from aeflow.nn.flow import PermutationStep


class ActNorm(Fm.ActNorm):
    """FrEIA's ActNorm (per-channel scale and shift set from the first batch, then trained), with the batch std
    floored: a backbone channel that is constant on the first batch (a dead ReLU, or a single sample) would
    otherwise get an infinite scale."""

    def _initialize_with_data(self, data: torch.Tensor) -> None:
        per_channel = data.detach().transpose(0, 1).reshape(self.dims_in[0], -1)
        std = per_channel.std(1, correction=0).clamp_min(1e-3)
        self.scale.data.view(-1)[:] = -std.log()
        self.bias.data.view(-1)[:] = -per_channel.mean(1) / std
        self.init_on_next_batch = False


def mlp_subnet(channels_in: int, channels_out: int) -> nn.Sequential:
    """The coupling network of CFlow and DifferNet: one hidden layer twice as wide as its input. The last layer
    starts at zero so every coupling starts as the identity and early training cannot blow up the log-det."""
    net = nn.Sequential(nn.Linear(channels_in, 2 * channels_in), nn.ReLU(), nn.Linear(2 * channels_in, channels_out))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def vector_flow(dims: int, steps: int, clamp: float, subnet=mlp_subnet, cond_dims: int | None = None) -> Ff.SequenceINN:
    """ActNorm followed by `steps` AllInOneBlocks on `dims`-dimensional vectors, optionally conditioned on a
    `cond_dims`-vector (passed as `c=[cond]`). Shared with DifferNet, whose flow is the unconditional case."""
    inn = Ff.SequenceINN(dims)
    inn.append(ActNorm)
    for _ in range(steps):
        inn.append(
            PermutationStep,
            cond=None if cond_dims is None else 0,
            cond_shape=None if cond_dims is None else (cond_dims,),
            subnet_constructor=subnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
    return inn


def positional_encoding_2d(dims: int, height: int, width: int) -> torch.Tensor:
    """dims x height x width sinusoidal encoding (Transformer-style): the first half of the channels encode the
    column, the second half the row; sin and cos alternate, with geometrically spaced frequencies."""
    if dims % 4:
        raise ConfigError(f"the positional encoding size must be a multiple of 4, got {dims}")
    half = dims // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(10000.0) / half))
    cols = torch.arange(width, dtype=torch.float32)[:, None] * freq  # width x half/2
    rows = torch.arange(height, dtype=torch.float32)[:, None] * freq
    enc = torch.zeros(dims, height, width)
    enc[0:half:2] = cols.sin().T[:, None, :].expand(-1, height, -1)
    enc[1:half:2] = cols.cos().T[:, None, :].expand(-1, height, -1)
    enc[half::2] = rows.sin().T[:, :, None].expand(-1, -1, width)
    enc[half + 1 :: 2] = rows.cos().T[:, :, None].expand(-1, -1, width)
    return enc


@register("cflow")
class CFlow(AnomalyModel):
    """CFlow-AD over a frozen `backbone` (see aeflow.nn.backbones). Paper defaults: 8 coupling steps per scale,
    128-dimensional positional condition, clamp 1.9. `positions_per_step` caps the feature vectors per scale
    used in one training step (the paper's fiber batches); they are drawn at random from the batch."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        flow_steps: int = 8,
        condition_dims: int = 128,
        clamp: float = 1.9,
        positions_per_step: int = 4096,
    ):
        super().__init__()
        if positions_per_step < 1:
            raise ConfigError(f"positions_per_step must be >= 1, got {positions_per_step}")
        positional_encoding_2d(condition_dims, 1, 1)  # validates condition_dims before building anything large
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.flows = nn.ModuleList(
            vector_flow(c, flow_steps, clamp, cond_dims=condition_dims) for c in self.features.out_channels
        )

    def _vectors(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per scale: feature vectors (B*h*w x C), their positional conditions (B*h*w x P) and (h, w)."""
        with torch.no_grad():
            stages = self.features(images)
        out = []
        for f in stages:
            b, c, h, w = f.shape
            pos = positional_encoding_2d(self._config["condition_dims"], h, w).to(f)
            cond = pos.flatten(1).T.repeat(b, 1)
            out.append((f.permute(0, 2, 3, 1).reshape(-1, c), cond, (h, w)))
        return out

    @staticmethod
    def _log_likelihood(flow: Ff.SequenceINN, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(x | position) per dimension, for each row of x."""
        z, log_det = flow(x, c=[cond])
        return (-0.5 * z.pow(2).sum(1) + log_det) / x.shape[1] - 0.5 * math.log(2 * math.pi)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        per_scale = []
        for (x, cond, _), flow in zip(self._vectors(batch.image), self.flows):
            if len(x) > self._config["positions_per_step"]:
                keep = torch.randperm(len(x), device=x.device)[: self._config["positions_per_step"]]
                x, cond = x[keep], cond[keep]
            per_scale.append(-self._log_likelihood(flow, x, cond).mean())
        return {"loss": sum(per_scale) / len(per_scale)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = len(images)
        anomaly_map = torch.zeros(b, 1, *images.shape[-2:], device=images.device)
        for (x, cond, (h, w)), flow in zip(self._vectors(images), self.flows):
            likelihood = self._log_likelihood(flow, x, cond).exp().view(b, 1, h, w)
            anomaly_map -= F.interpolate(likelihood, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = anomaly_map.squeeze(1)
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}

