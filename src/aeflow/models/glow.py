"""Glow: generative flow with invertible 1x1 convolutions (Kingma and Dhariwal, NeurIPS 2018, arXiv:1807.03039),
used as an anomaly detector: the likelihood of the image itself, no pretrained features.

The flow maps an image x to latents z = f(x) with a tractable log-determinant, so that
log p(x) = log p(z) + log|det df/dx|, and is trained by maximum likelihood on normal images.

- Dequantisation (as in the paper, after Dinh et al. 2017): images are stored at a finite bit depth (2^n_bits levels,
  8 by default). During training uniform noise of one level's width is added, y = (x * (K - 1) + u) / K with
  u ~ U[0, 1) and K = 2^n_bits, which turns the discrete likelihood into a continuous one it bounds from below;
  at test time u = 1/2 (the level's centre), so scoring is deterministic. The flow sees y - 1/2.
- Multi-scale architecture (paper figure 2, after RealNVP): L levels; each level squeezes the map (every 2 x 2
  block of pixels becomes 4 channels, F.pixel_unshuffle), applies K steps of flow, and (except the last level)
  splits off half of the channels as a latent z_l. Each split has a learned prior: the mean and log-std of z_l are
  predicted from the kept half by a zero-initialised 3x3 convolution, p(z_l | h_l) = N(mu(h_l), sigma(h_l)^2).
  The top latent's prior is a Gaussian with a learned mean and log-std per channel (the paper's "learn_top").
- One step of flow (paper table 1): actnorm (per-channel scale and bias, initialised from the first training batch
  so the activations start at zero mean and unit variance), an invertible 1x1 convolution (LU-decomposed:
  W = P L (U + diag(sign(s) exp(log|s|))), P fixed, so log|det W| = h w sum log|s| costs nothing), and an affine
  coupling: (x_a, x_b) = split(x), (t, g) = NN(x_a), y_b = (x_b + t) * sigmoid(g + 2), y_a = x_a. NN is the
  paper's 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> zero-initialised 3x3 conv, so every step starts as the identity
  after actnorm and the 1x1 convolution.
- Loss and score: the negative log-likelihood in bits per dimension, -(log p(x)) / (D ln 2) with D = C H W and
  log p(x) including the dequantisation's -D log K. The image score is the bits/dim of the test image.
- Anomaly map: the NLL per position. Every term of -log p(x) belongs to one position of one level (a latent's
  -log p summed over its channels, the coupling's per-position log-scale, actnorm's and the 1x1 conv's constant
  per-position log-determinant); a level-l position covers a 2^l x 2^l block of input pixels, so its value is
  spread evenly over that block (nearest up-sampling divided by 4^l). The map is in bits/dim per pixel and its mean
  over the image is exactly the image score.

Why FrEIA's blocks are not used here (FastFlow, AE-FLOW and CFlow use them): its ActNorm fixes the log-determinant
to the spatial size given at construction (one model could then score one image size only), it has no learned
1x1 convolution (Fixed1x1Conv is fixed), no split with a learned prior, and its couplings return only the summed
log-determinant while the map needs it per position. The blocks below are those four, each with its inverse.

Departures from the paper, all sizes: K = 8 steps per level and 128 hidden channels by default (the paper: K = 32,
512 channels, L = 3), so that a model trains in minutes on a CPU; the coupling network uses biases where the paper
uses actnorm inside it, and Glow's learned scaling of the zero-initialised convolutions (exp(3 * logs)) is left out.

Known caveat: likelihoods of flows on images are dominated by low-level statistics (Nalisnick et al., ICLR 2019,
"Do deep generative models know what they don't know?"; Kirichenko et al., NeurIPS 2020, "Why normalizing flows fail
to detect out-of-distribution data"): smooth, low-contrast images get high likelihood whatever they show, because
the flow learns local pixel correlations rather than semantics. An anomaly that makes an image smoother (e.g. a
pneumonia X-ray, whose opacities lower contrast) can then score as MORE normal. Measured on the boards (64 px,
4 epochs, docs/results/rows_flows.md): PneumoniaMNIST test AUROC 0.16 +- 0.04 over 3 seeds, i.e. inverted, with a
Spearman correlation of 0.73-0.88 between the image's bits/dim and its mean absolute neighbour-pixel difference
(sharpness); magnetic tiles 0.54 +- 0.02, where that correlation is 0.94-0.95, so the score is almost only the
image's sharpness, which does not tell defects from normal tiles there (AUROC 0.47-0.51 on its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import check_image_size
from aeflow.nn.flow import LOG_SQRT_2PI, ActNorm2d


class InvertibleConv1x1(nn.Module):
    """The paper's invertible 1x1 convolution in its LU form, initialised as a random rotation (log|det| = 0).

    forward returns (y, log|det| per position, B x h x w); the inverse uses triangular solves, not a general matrix
    inverse."""

    def __init__(self, channels: int):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", diagonal.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(diagonal.abs().log())

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(len(self.log_s), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        weight = self.permutation @ lower @ upper
        b, c, h, w = x.shape
        return F.conv2d(x, weight.view(c, c, 1, 1)), self.log_s.sum().expand(b, h, w)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self._factors()
        b, c, h, w = y.shape
        # W^-1 y = U^-1 L^-1 P^T y, with the channels as the rows of a c x (b h w) matrix.
        columns = self.permutation.T @ y.transpose(0, 1).reshape(c, -1)
        columns = torch.linalg.solve_triangular(lower, columns, upper=False, unitriangular=True)
        columns = torch.linalg.solve_triangular(upper, columns, upper=True)
        return columns.view(c, b, h, w).transpose(0, 1)


def zero_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 convolution that starts at zero: the paper's last layer of every coupling network and prior."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class AffineCoupling(nn.Module):
    """y_a = x_a, y_b = (x_b + t(x_a)) * sigmoid(g(x_a) + 2): the scale lies in (0, 1) and starts near
    sigmoid(2) = 0.88, the paper's stabilised form of the RealNVP coupling."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.split = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(self.split, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            zero_conv(hidden, 2 * (channels - self.split)),
        )

    def _shift_and_log_scale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, gate = self.net(x_a).chunk(2, dim=1)
        return shift, F.logsigmoid(gate + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, log_scale = self._shift_and_log_scale(x_a)
        return torch.cat([x_a, (x_b + shift) * log_scale.exp()], 1), log_scale.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, log_scale = self._shift_and_log_scale(y_a)
        return torch.cat([y_a, y_b * torch.exp(-log_scale) - shift], 1)


class FlowStep(nn.Module):
    """actnorm -> invertible 1x1 convolution -> affine coupling."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm2d(channels), InvertibleConv1x1(channels), AffineCoupling(channels, hidden)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = 0
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)^2) summed over channels: B x h x w."""
    return (-0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std - LOG_SQRT_2PI).sum(1)


class SplitPrior(nn.Module):
    """Splits off the second half of the channels as a latent, with p(z | kept half) from a zero-initialised conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.prior = zero_conv(self.keep, 2 * (channels - self.keep))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (kept half, latent, log p(latent | kept half) per position)."""
        kept, z = h[:, : self.keep], h[:, self.keep :]
        mean, log_std = self.prior(kept).chunk(2, dim=1)
        return kept, z, gaussian_log_prob(z, mean, log_std)


class GlowLevel(nn.Module):
    """squeeze -> K steps -> split (all levels but the last)."""

    def __init__(self, channels: int, steps: int, hidden: int, split: bool):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(channels, hidden) for _ in range(steps))
        self.split = SplitPrior(channels) if split else None


@register("glow")
class Glow(AnomalyModel):
    """Glow on the image, `levels` x `steps` flow steps with `hidden_channels`-wide coupling networks; images of
    `in_channels` channels whose sides are multiples of 2^levels, quantised to 2^n_bits levels."""

    def __init__(
        self,
        in_channels: int = 1,
        levels: int = 3,
        steps: int = 8,
        hidden_channels: int = 128,
        n_bits: int = 8,
    ):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("levels", levels, 1), ("steps", steps, 1),
                                 ("hidden_channels", hidden_channels, 1), ("n_bits", n_bits, 1)):
            if int(value) != value or value < low:
                raise ConfigError(f"glow {name} must be an integer >= {low}, got {value!r}")
        if n_bits > 16:
            raise ConfigError(f"glow n_bits must be <= 16, got {n_bits}")
        self.n_bits = n_bits
        self.levels = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            channels *= 4  # squeeze
            last = level == levels - 1
            self.levels.append(GlowLevel(channels, steps, hidden_channels, split=not last))
            if not last:
                channels = self.levels[-1].split.keep
        self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.top_log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))

    # --- the flow -----------------------------------------------------------------------------------------------

    def dequantize(self, images: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] -> y - 1/2 with y = (x (K - 1) + u) / K: u ~ U[0, 1) in training, 1/2 at test time."""
        bins = 2**self.n_bits
        noise = torch.rand_like(images) if self.training else torch.full_like(images, 0.5)
        return (images * (bins - 1) + noise) / bins - 0.5

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Dequantised x -> (latents z_1..z_L, log|det| per position of each level, log p(z_l) per position).

        The latents together are f(x), an invertible function of x (see `decode`); the log-determinants are those
        of f, the log-probabilities those of the priors."""
        latents, log_dets, log_probs = [], [], []
        h = x
        for level in self.levels:
            h = F.pixel_unshuffle(h, 2)
            log_det = torch.zeros(h.shape[0], *h.shape[-2:], device=h.device, dtype=h.dtype)
            for step in level.steps:
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level.split is not None:
                h, z, log_p = level.split(h)
            else:
                z = h
                log_p = gaussian_log_prob(z, self.top_mean, self.top_log_std)
            latents.append(z)
            log_dets.append(log_det)
            log_probs.append(log_p)
        return latents, log_dets, log_probs

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of `encode`: latents z_1..z_L -> dequantised x."""
        h = latents[-1]
        for level, z in zip(reversed(self.levels), reversed(latents)):
            if level.split is not None:
                h = torch.cat([h, z], 1)
            for step in reversed(level.steps):
                h = step.inverse(h)
            h = F.pixel_shuffle(h, 2)
        return h

    def _nll_nats(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-log p(x) per image (nats, dequantisation included) and each level's NLL map (nats per position)."""
        check_image_size(images, 2 ** len(self.levels))
        _, log_dets, log_probs = self.encode(self.dequantize(images))
        level_maps = [-(log_p + log_det) for log_det, log_p in zip(log_dets, log_probs)]
        dequantization = images[0].numel() * self.n_bits * math.log(2)
        return sum(m.flatten(1).sum(1) for m in level_maps) + dequantization, level_maps

    # --- loss and score -----------------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        nll, _ = self._nll_nats(batch.image)
        return {"loss": (nll / (batch.image[0].numel() * math.log(2))).mean()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        nll, level_maps = self._nll_nats(images)
        channels = images.shape[1]
        per_pixel = torch.full(images.shape[-2:], channels * self.n_bits * math.log(2), device=images.device)
        per_pixel = per_pixel.expand(len(images), -1, -1)
        for level, level_map in enumerate(level_maps, start=1):
            block = 2**level
            per_pixel = per_pixel + F.interpolate(level_map[:, None], scale_factor=block, mode="nearest")[:, 0] / block**2
        bits = channels * math.log(2)
        return {"pred_score": nll / (images[0].numel() * math.log(2)), "anomaly_map": per_pixel / bits}
