"""The normalizing-flow bottleneck of AE-FLOW: K invertible steps over the encoder's feature map.

Each step is FrEIA's `AllInOneBlock` (computed as `PermutationStep`, below), which is exactly the paper's step:
an affine coupling whose log-scale is soft-clamped by `clamp * tanh(.)`, a Softplus global affine scaling
("ActNorm") and a fixed random channel permutation. The steps act on the C x h x w map with convolutional
coupling networks, so the spatial size is not baked in: one flow serves every input size.

Two coupling networks, as in the paper: "conv" (FastFlow's 3x3 conv -> ReLU -> 1x1 conv) and "resnet"
(3x3 conv + BatchNorm + ReLU, plus a 1x1-conv shortcut).

One departure from FrEIA, in how the step is computed, not in what: `PermutationStep` applies the fixed channel
permutation by indexing instead of FrEIA's convolution with a 0/1 matrix: C x C multiply-adds per position, in
the forward pass and again in the backward, against 2.75 C^2 for the "conv" coupling network at hidden ratio 1
and 5 C^2 for the "resnet" one. The outputs are the same bit for bit and the state dict is FrEIA's, so
checkpoints load either way.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

from aeflow.errors import ConfigError

SUBNETS = ("conv", "resnet")
INPUT_NORMS = ("channel", "image")


class ConvSubnet(nn.Sequential):
    """FastFlow's coupling network. The last conv starts at zero, so every coupling starts as the identity
    (Glow's trick): the untrained flow is then just the global scaling and permutation, and early steps of
    training cannot blow up the log-determinant."""

    def __init__(self, channels_in: int, channels_out: int, hidden_ratio: float = 1.0):
        hidden = max(1, round(channels_in * hidden_ratio))
        super().__init__(
            nn.Conv2d(channels_in, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, 1),
        )
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


class ResNetSubnet(nn.Module):
    """The paper's residual coupling network: relu(bn(conv3x3(x))) + conv1x1(x).

    Only the shortcut starts at zero. Zeroing the BatchNorm scale as well would feed exact zeros into the
    ReLU, whose gradient there is zero, and the main branch would never learn; FrEIA's 0.1 factor on the
    coupling outputs and the tanh clamp keep the non-zero start stable.
    """

    def __init__(self, channels_in: int, channels_out: int, hidden_ratio: float = 1.0):
        super().__init__()
        del hidden_ratio  # one conv maps straight to the coupling coefficients: there is no hidden width
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1)
        nn.init.zeros_(self.shortcut.weight)
        nn.init.zeros_(self.shortcut.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class PermutationStep(Fm.AllInOneBlock):
    """FrEIA's AllInOneBlock with its hard channel permutation done by `index_select` (see the module docstring).

    Only the hard permutation (`permute_soft=False`, no Householder reflections, no pre-permutation) has an index
    form; the others are refused. The indices follow `w_perm` (buffers, refreshed when a state dict is loaded).
    """

    def __init__(self, dims_in, dims_c=None, **kwargs):
        if kwargs.get("permute_soft") or kwargs.get("learned_householder_permutation") or kwargs.get(
                "reverse_permutation"):
            raise ConfigError("PermutationStep needs a hard permutation: permute_soft, learned_householder_"
                              "permutation and reverse_permutation must be off")
        super().__init__(dims_in, [] if dims_c is None else dims_c, **kwargs)
        self.register_buffer("perm_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("perm_inverse_index", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh_indices()

    @torch.no_grad()
    def _refresh_indices(self) -> None:
        # w_perm[i, j] = 1 where output channel i takes input channel j: out_i = x_j, so index i -> j.
        w = self.w_perm.detach().flatten(1)
        index = w.argmax(1)
        if not (torch.equal(w.sum(1), torch.ones_like(w[:, 0])) and torch.equal(w.amax(1), torch.ones_like(w[:, 0]))
                and torch.equal(index.sort().values, torch.arange(len(index), device=index.device))):
            raise ConfigError("the flow step's w_perm is not a permutation matrix")
        self.perm_index = index.to(self.w_perm.device)
        self.perm_inverse_index = torch.argsort(index).to(self.w_perm.device)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_indices()

    def _permute(self, x, rev=False):
        if self.GIN:
            scale, perm_log_jac = 1.0, 0.0
        else:
            scale = self.global_scale_activation(self.global_scale)
            perm_log_jac = torch.sum(torch.log(scale))
        if rev:
            return (x.index_select(1, self.perm_inverse_index) - self.global_offset) / scale, perm_log_jac
        return (x * scale + self.global_offset).index_select(1, self.perm_index), perm_log_jac


def _subnet_constructor(kind: str, hidden_ratio: float):
    cls = {"conv": ConvSubnet, "resnet": ResNetSubnet}[kind]
    return lambda channels_in, channels_out: cls(channels_in, channels_out, hidden_ratio)


class FlowBottleneck(nn.Module):
    """z (B x C x h x w) -> z' of the same shape, and log|det dz'/dz| per sample (B,).

    Before the K steps the features are brought to unit scale, in one of two ways (`input_norm`):

    - "channel": z is standardised per channel with the mean and std of the first training batch (Glow's
      data-dependent ActNorm initialisation, kept fixed afterwards; its constant log-determinant is included,
      so the likelihood is that of z itself). Why some standardisation: backbone features are far from unit
      scale (EfficientNet-Lite0 at stride 16: channel means up to 15, stds 3.5-15), and AllInOneBlock's global
      scaling, 0.1 * softplus, needs thousands of Adam steps to absorb that.
    - "image": each image's map is standardised by its own mean and std over (C, h, w), a LayerNorm without
      affine, as FastFlow does. This is not invertible (it forgets two numbers per image, the feature map's
      offset and scale), so the flow models the density of the normalised map u = (z - m(z)) / s(z), and
      log|det| is that of u -> z'. Deliberately: the overall feature scale is a property of the image's
      contrast, not of its content (on PneumoniaMNIST the per-image feature std alone ranks pneumonia at
      test AUROC 0.19, i.e. inverted: benchmarks/pneumonia_probe.py), and a likelihood that keeps it is ruled
      by it. `inverse` then returns u.

    The fixed permutations are drawn from numpy's global generator (FrEIA's choice) when the flow is built.
    Permutations and standardisation are in the state dict, so a flow rebuilt from its config and weights
    is the same flow.
    """

    def __init__(
        self,
        channels: int,
        steps: int = 8,
        subnet: str = "resnet",
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        input_norm: str = "channel",
    ):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ConfigError(f"flow input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.input_norm = input_norm
        if subnet not in SUBNETS:
            raise ConfigError(f"flow subnet must be one of {SUBNETS}, got {subnet!r}")
        if steps < 1:
            raise ConfigError(f"flow steps must be >= 1, got {steps}")
        # AllInOneBlock reads only the channel count and the rank from these dims, so 1 x 1 stands for any
        # spatial size.
        self.inn = Ff.SequenceINN(channels, 1, 1)
        for _ in range(steps):
            self.inn.append(
                PermutationStep,
                subnet_constructor=_subnet_constructor(subnet, hidden_ratio),
                affine_clamping=clamp,
                global_affine_type="SOFTPLUS",
                permute_soft=False,
            )
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_norm == "image":
            return self.inn(image_norm(z))
        if self.training and not self.initialized:
            self._initialize(z)
        z_prime, log_det = self.inn((z - self.feature_mean) / self.feature_std)
        standardize_log_det = -z[0, 0].numel() * self.feature_std.log().sum()
        return z_prime, log_det + standardize_log_det

    def inverse(self, z_prime: torch.Tensor) -> torch.Tensor:
        """z' -> z ("channel"), or -> the normalised map u ("image": its offset and scale are not kept)."""
        z, _ = self.inn(z_prime, rev=True)
        if self.input_norm == "image":
            return z
        return z * self.feature_std + self.feature_mean

    @torch.no_grad()
    def _initialize(self, z: torch.Tensor) -> None:
        per_channel = z.detach().float().transpose(0, 1).flatten(1)
        self.feature_mean.copy_(per_channel.mean(1).view_as(self.feature_mean))
        self.feature_std.copy_(per_channel.std(1).clamp_min(1e-3).view_as(self.feature_std))
        self.initialized.fill_(True)


def image_norm(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each map of B x C x h x w standardised by its own mean and std over (C, h, w) (a LayerNorm without affine)."""
    return torch.nn.functional.group_norm(z, 1, eps=eps)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(z; 0, 1)."""
    return -0.5 * z.pow(2) - LOG_SQRT_2PI


def bits_per_dim(log_pz: torch.Tensor, log_det: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-image negative log-likelihood of z in bits per latent dimension: -(log p(z') + log|det|) / (dims ln 2),
    from the summed log-density of z' and the flow's log-determinant (both B)."""
    return -(log_pz + log_det) / (dims * math.log(2))


class ActNorm2d(nn.Module):
    """Glow's activation normalisation on B x C x h x w maps: y = (x - bias) * exp(log_scale) per channel, with
    bias and scale set from the first training batch so that y has zero mean and unit variance per channel
    (data-dependent initialisation), then trained like any parameter.

    FrEIA's ActNorm does the same but fixes its log-determinant to the spatial size given at construction and does
    not floor the batch std; this one counts the positions of the map it is given (one module serves every input
    size) and floors the std at 1e-3 (a channel constant on the first batch would get an infinite scale).
    forward returns (y, log|det| per position, B x h x w), which sums to the image's log-determinant.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.initialized:
            self._initialize(x)
        b, _, h, w = x.shape
        return (x - self.bias) * self.log_scale.exp(), self.log_scale.sum().expand(b, h, w)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) + self.bias

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        per_channel = x.detach().transpose(0, 1).flatten(1)
        self.bias.copy_(per_channel.mean(1).view_as(self.bias))
        self.log_scale.copy_(-per_channel.std(1, correction=0).clamp_min(1e-3).log().view_as(self.log_scale))
        self.initialized.fill_(True)
