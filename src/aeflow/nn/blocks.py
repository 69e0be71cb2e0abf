"""Building blocks shared by several models: conv encoder/decoder, smoothing, reconstruction scores, Perlin noise.

Each block lives here because at least two model files use it; a block used by one method stays in that method's
file so the file still reads like its paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from aeflow.errors import ConfigError, DataError


def conv_bn_act(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, LeakyReLU: the unit of every conv encoder and decoder here."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class UNet(nn.Module):
    """A plain U-Net: per level two `conv_bn_act` (`widths`, max-pooled between levels), 2x2 stride-2
    transposed convolutions up, the skip of each level concatenated, a 1x1 convolution to `out_channels` (logits:
    no activation; a subclass may wrap `head`)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]):
        super().__init__()
        self.down, channels = nn.ModuleList(), in_channels
        for width in widths:
            self.down.append(nn.Sequential(conv_bn_act(channels, width), conv_bn_act(width, width)))
            channels = width
        self.up, self.fuse = nn.ModuleList(), nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.fuse.append(nn.Sequential(conv_bn_act(2 * width, width), conv_bn_act(width, width)))
            channels = width
        self.head: nn.Module = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class ConvEncoder(nn.Sequential):
    """B x C x H x W -> B x widths[-1] x H/2^n x W/2^n, n = len(widths): every stage halves the size."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        stages, channels = [], in_channels
        for width in widths:
            stages.append(nn.Sequential(conv_bn_act(channels, width, stride=2), conv_bn_act(width, width)))
            channels = width
        super().__init__(*stages)
        self.out_channels = channels


class ConvDecoder(nn.Sequential):
    """B x in_channels x h x w -> B x out_channels x h*2^n x w*2^n with values in (0, 1), like the input images.

    Each stage doubles the size with a stride-2 transposed convolution and refines with a 3x3 convolution.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        stages, channels = [], in_channels
        for width in widths:
            stages.append(
                nn.Sequential(
                    nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.LeakyReLU(0.2, inplace=True),
                    conv_bn_act(width, width),
                )
            )
            channels = width
        stages.append(nn.Sequential(nn.Conv2d(channels, out_channels, 3, padding=1), nn.Sigmoid()))
        super().__init__(*stages)


def check_image_size(images: torch.Tensor, multiple: int) -> None:
    """Models that halve the size n times need sides divisible by 2^n; say so instead of a shape error deep inside."""
    h, w = images.shape[-2:]
    if h % multiple or w % multiple:
        raise DataError(f"image size {h}x{w} must be a multiple of {multiple} for this model; resize the input")


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth B x H x W anomaly maps with a Gaussian (truncated at 4 sigma, reflected borders).

    Pixel residuals and patch distances are noisy at the pixel scale while lesions are not; every
    method in the literature smooths its map (PaDiM and PatchCore with sigma = 4 at 224-256 px).
    """
    if sigma <= 0:
        return maps
    radius = min(math.ceil(4 * sigma), min(maps.shape[-2:]) - 1)  # reflect padding must stay inside the map
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def top_k_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest `fraction` of each map's values: a small lesion decides the score, one noisy pixel
    does not."""
    flat = maps.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


RECONSTRUCTION_SCORES = ("mse", "topk", "ssim")


def reconstruction_scores(
    images: torch.Tensor, recon: torch.Tensor, *, blur_sigma: float, topk_fraction: float
) -> dict[str, torch.Tensor]:
    """The usual outputs of a reconstruction model: a residual map and three image scores.

    anomaly_map: squared residual averaged over channels, smoothed. score_mse: mean squared residual.
    score_topk: mean of the top fraction of the smoothed map. score_ssim: -SSIM(x, x') (higher = worse
    reconstruction), the reconstruction score of AE-FLOW.
    """
    residual = (images - recon).pow(2).mean(1)
    anomaly_map = gaussian_blur(residual, blur_sigma)
    return {
        "anomaly_map": anomaly_map,
        "score_mse": residual.flatten(1).mean(1),
        "score_topk": top_k_mean(anomaly_map, topk_fraction),
        "score_ssim": -ssim(images, recon, data_range=1.0, size_average=False),
    }


def check_score_options(score: str, choices: Sequence[str], topk_fraction: float, blur_sigma: float) -> None:
    """Validate the scoring options of reconstruction models at construction, with a message naming the option."""
    if score not in choices:
        raise ConfigError(f"score must be one of {', '.join(choices)}; got {score!r}")
    if not 0 < topk_fraction <= 1:
        raise ConfigError(f"topk_fraction must be in (0, 1]; got {topk_fraction}")
    if blur_sigma < 0:
        raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    batch: int,
    height: int,
    width: int,
    cells: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gradient (Perlin) noise, B x H x W with values in about [-1, 1]: smooth random blobs of `cells` per side.

    Random unit gradients sit on a (cells_y + 1) x (cells_x + 1) lattice; each pixel blends the dot products
    with its four lattice corners through the quintic fade curve (Perlin 2002). DRAEM thresholds it into
    irregular anomaly shapes; it also makes smooth random textures.
    """
    cells_y, cells_x = cells
    angles = 2 * math.pi * torch.rand(batch, cells_y + 1, cells_x + 1, generator=generator, device=device)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=-1)
    y = torch.arange(height, device=device) * (cells_y / height)
    x = torch.arange(width, device=device) * (cells_x / width)
    iy, ix = y.long(), x.long()
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[:, iy + dy][:, :, ix + dx]  # B x H x W x 2
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), v)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), v)
    return math.sqrt(2) * torch.lerp(top, bottom, u)


# Submodules of each trunk in aeflow.nn.backbones whose outputs are its stride-4, -8 and -16 stages.
_STAGE_MODULES = {
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "efficientnet_lite0": ("_blocks.2", "_blocks.4", "_blocks.10"),  # last block at 24, 40 and 112 channels
    "efficientnet_lite1": ("_blocks.3", "_blocks.6", "_blocks.14"),  # last block at 24, 40 and 112 channels
    "efficientnet_lite2": ("_blocks.3", "_blocks.6", "_blocks.14"),  # last block at 24, 48 and 120 channels
}


class FeatureStages(nn.Module):
    """A frozen backbone read at its stride-4, -8 and -16 stages: the multi-scale features of PaDiM, PatchCore and
    FastFlow. forward(images in [0, 1], 1 or 3 channels) -> [B x C_i x H/s x W/s for s in 4, 8, 16].

    The stages are caught by `stage_outputs`.
    """

    strides = (4, 8, 16)

    def __init__(self, backbone: str, *, pretrained: bool = True, weights: str | None = None):
        from aeflow.nn.backbones import create_backbone

        super().__init__()
        if backbone not in _STAGE_MODULES:
            raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(_STAGE_MODULES)}")
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, frozen=True)
        self.stage_modules = _STAGE_MODULES[backbone]
        with torch.no_grad():
            self.out_channels = [f.shape[1] for f in self(torch.zeros(1, 3, 32, 32))]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return stage_outputs(self.backbone, self.stage_modules, images)


def stage_modules(backbone: str, strides: Sequence[int]) -> tuple[str, ...]:
    """Names of the submodules of `backbone` whose outputs are its stages at `strides` (each 4, 8 or 16)."""
    if backbone not in _STAGE_MODULES:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(_STAGE_MODULES)}")
    by_stride = dict(zip(FeatureStages.strides, _STAGE_MODULES[backbone]))
    unknown = [s for s in strides if s not in by_stride]
    if unknown:
        raise ConfigError(f"backbone stages exist at strides {FeatureStages.strides}, got {list(strides)}")
    return tuple(by_stride[s] for s in strides)


def stage_outputs(backbone: nn.Module, module_names: Sequence[str], images: torch.Tensor) -> list[torch.Tensor]:
    """Run `backbone` on `images` and return the outputs of the named submodules, in the order named.

    The outputs are caught with forward hooks that live only during this call, so the backbone stays a plain
    module (it exports and pickles like one)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, inputs, output: outputs.__setitem__(name, output)

    handles = [backbone.get_submodule(name).register_forward_hook(keep(name)) for name in module_names]
    try:
        backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in module_names]


def adopt_buffer_shapes(module: nn.Module, state_dict: dict, prefix: str, names: Sequence[str]) -> None:
    """Let load_state_dict fill buffers whose shape is only known after fitting (memory banks, Gaussians).

    Call from `_load_from_state_dict`: each named buffer is replaced by an empty one of the saved shape.
    """
    for name in names:
        saved = state_dict.get(prefix + name)
        if saved is not None:
            setattr(module, name, torch.empty_like(saved, device=getattr(module, name).device))


class Moments:
    """Running sums of x and x^2 over the batch dimension of tensors B x ... (float64): the mean and standard
    deviation of every element (a pixel, a position and channel) over all images seen, from one pass.

    The per-position Gaussians of the classical detectors (statistical, filter-bank, texture) and the normal-image
    statistics that put their score components on one scale all come from it.
    """

    def __init__(self):
        self.count, self.total, self.total_sq = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        if self.total is None:
            self.total, self.total_sq = torch.zeros_like(x[0]), torch.zeros_like(x[0])
        self.total += x.sum(0)
        self.total_sq += x.pow(2).sum(0)
        self.count += x.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample standard deviation (float32); DataError below two samples."""
        if self.count < 2:
            raise DataError(f"need at least 2 training images to estimate a spread; got {self.count}")
        mean = self.total / self.count
        var = (self.total_sq - self.count * mean.pow(2)).clamp_min(0) / (self.count - 1)
        return mean.float(), var.sqrt().float()


def gaussian_precisions(total: torch.Tensor, outer: torch.Tensor, count: int, epsilon: float):
    """Means (P x d) and inverse covariances (P x d x d) from sums over `count` samples of x and x x^T.

    The covariance gets epsilon * I (PaDiM's 0.01) so that it is invertible with few training images. The
    inverse goes through Cholesky: batched LU inversion (torch.linalg.inv) with oneMKL on AMD EPYC CPUs returns
    wrong values without an error, and a regularised covariance is positive definite, which Cholesky exploits.
    """
    mean = total / count
    cov = (outer - count * mean.unsqueeze(2) * mean.unsqueeze(1)) / (count - 1)
    cov = cov + epsilon * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))


class PositionGaussians:
    """Running sums, over images, of each position's feature vector x (d channels) and of x x^T (float64): one
    multivariate Gaussian N(mu_p, Sigma_p) per position p, as PaDiM models its patches and AE-FLOW its latent
    reference. Sums shard: under DDP `all_reduce` adds every rank's before the Gaussians are formed.
    """

    def __init__(self):
        self.count, self.total, self.outer = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        """x: B x d x h x w."""
        x = x.detach().flatten(2).permute(2, 0, 1).double()  # P x B x d
        if self.total is None:
            self.total, self.outer = torch.zeros_like(x[:, 0]), x.new_zeros(x.shape[0], x.shape[2], x.shape[2])
        self.total += x.sum(1)
        self.outer += x.transpose(1, 2) @ x
        self.count += x.shape[1]

    def all_reduce(self) -> None:
        """Sum count and sums over the processes of a torch.distributed group (nothing without one)."""
        import torch.distributed as dist

        if self.total is None or not (dist.is_available() and dist.is_initialized()):
            return
        count = torch.tensor([self.count], dtype=torch.float64, device=self.total.device)
        for value in (count, self.total, self.outer):
            dist.all_reduce(value)
        self.count = int(count.item())

    def gaussians(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (P x d) and precisions (P x d x d), float32; DataError below two images."""
        if self.count < 2:
            raise DataError(f"need at least 2 training images to estimate covariances; got {self.count}")
        mean, precision = gaussian_precisions(self.total, self.outer, self.count, epsilon)
        return mean.float(), precision.float()


def mahalanobis_squared(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(x_p - mu_p)^T Sigma_p^-1 (x_p - mu_p) at every position: x B x d x h x w, mean P x d, precision
    P x d x d (P = h w) -> B x h x w."""
    b, d, h, w = x.shape
    diff = x.flatten(2).permute(2, 0, 1) - mean.unsqueeze(1)  # P x B x d
    return ((diff @ precision) * diff).sum(-1).clamp_min(0).T.reshape(b, h, w)
