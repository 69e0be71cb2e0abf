"""EdgRec: reconstruction from the edge image, scored by colour and gradient differences (Liu, Li, Zhao, Du, Jiang,
Geng, "Reconstruction from edge image combined with color and gradient difference for industrial surface anomaly
detection", 2022, arXiv:2210.14485). Registered as "edgerec".

Read top to bottom like the paper's method section:

1. Edge input: the image is turned to gray and reduced to its gray-value edges. The edges keep the high-frequency
   structure of the image (which a bottlenecked autoencoder fails to reproduce on normal images, giving false
   positives), while the network must restore the intensities (colours) and low-frequency content from what it
   learned of normal images, which it cannot do for an anomaly's.
2. Denoising: in training the image is first corrupted by pseudo anomalies of several scales and the network must
   restore the clean image from the corrupted image's edges, so it cannot simply copy structure through.
3. Network: a U-Net-type autoencoder with skip connections, edges -> image.
4. Score: a hand-crafted evaluation of the residual from two terms, a colour difference in CIELAB space and a
   gradient difference, 1 - MSGMS (multi-scale gradient magnitude similarity, as in RIAD, Zavrtanik et al. 2021).
   Their sum, smoothed, is the anomaly map; the mean of its highest values the image score.

Choices this file makes where the paper leaves room or cannot be followed here, and why:

- Edges: the Sobel gradient magnitude of the gray image, in torch (batched, on the model's device, exportable),
  divided by its largest possible value (4 sqrt 2 for intensities in [0, 1]) so edge strength keeps its meaning
  across images; no thresholding (a Canny map would drop the weak edges of soft-tissue images).
- Pseudo anomalies: DRAEM's Perlin-noise simulation (aeflow.models.draem.simulate_anomalies, masks of 1 to 32
  cells per side, i.e. several scales, filled with a foreign texture or flipped anatomy), applied with
  `anomaly_probability`.
- Loss: L2 + (1 - SSIM) between the restored and the clean image, as DRAEM's reconstructive network.
- Grayscale data (1 channel): CIELAB colour difference reduces to the lightness difference |L*(x) - L*(x')|
  (gray values taken as sRGB-encoded); 3-channel images use the full Delta E*ab (CIE76). Both are divided by 100
  (the L* range) so that they live on the same [0, 1] scale as 1 - MSGMS; `color_weight` weighs the colour term.
- MSGMS: Prewitt gradients, c = 0.0026, scales 1, 1/2, 1/4, 1/8 (RIAD's settings), each GMS map up-sampled back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.draem import simulate_anomalies
from aeflow.nn.blocks import UNet, check_image_size, gaussian_blur, top_k_mean

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
SOBEL_MAX = 4 * math.sqrt(2)  # largest Sobel magnitude on [0, 1] images (a step of 1 along both axes)
GMS_C = 0.0026
GMS_SCALES = (1, 2, 4, 8)


# --- 1. edge input ---------------------------------------------------------------------------------------------


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """B x {1,3} x H x W -> B x 1 x H x W."""
    if images.shape[1] == 1:
        return images
    return (images * images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _gradient_magnitude(gray: torch.Tensor, kernel_x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kernel_x.view(1, 1, 3, 3))
    gy = F.conv2d(padded, kernel_x.T.contiguous().view(1, 1, 3, 3))
    return (gx.pow(2) + gy.pow(2) + 1e-12).sqrt()


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """The network's input: Sobel gradient magnitude of the gray image, B x 1 x H x W, in [0, 1]."""
    kernel = images.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return _gradient_magnitude(to_gray(images), kernel) / SOBEL_MAX


# --- 3. the U-Net -----------------------------------------------------------------------------------------------


class EdgeUNet(UNet):
    """U-Net (skip connections at every level) from the 1-channel edge map to the image, values in (0, 1)."""

    def __init__(self, out_channels: int, widths: Sequence[int]):
        super().__init__(1, out_channels, widths)
        self.head = nn.Sequential(self.head, nn.Sigmoid())


# --- 4. the colour and gradient differences ---------------------------------------------------------------------


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    delta = 6 / 29
    return torch.where(t > delta**3, t.clamp_min(1e-12) ** (1 / 3), t / (3 * delta**2) + 4 / 29)


def cielab(images: torch.Tensor) -> torch.Tensor:
    """sRGB (3 channels, [0, 1]) -> CIELAB (D65), or a gray image (1 channel) -> its lightness L*; B x {3,1} x H x W."""
    linear = _srgb_to_linear(images.clamp(0, 1))
    if images.shape[1] == 1:
        return 116 * _lab_f(linear) - 16
    to_xyz = images.new_tensor([[0.4124564, 0.3575761, 0.1804375],
                                [0.2126729, 0.7151522, 0.0721750],
                                [0.0193339, 0.1191920, 0.9503041]])
    white = images.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / white
    fx, fy, fz = _lab_f(xyz).unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def color_difference(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Delta E*ab (CIE76) per pixel, |Delta L*| for gray images, divided by 100: B x H x W in about [0, 1]."""
    return (cielab(images) - cielab(recon)).pow(2).sum(1).add(1e-12).sqrt() / 100


def msgms_difference(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """1 - multi-scale gradient magnitude similarity of the gray images, B x H x W in [0, 1]."""
    kernel = images.new_tensor([[-1.0, 0.0, 1.0]] * 3) / 3  # Prewitt
    a, b = to_gray(images), to_gray(recon)
    size = images.shape[-2:]
    maps = []
    for scale in GMS_SCALES:
        if min(size) // scale < 2:
            break
        xs, ys = (F.avg_pool2d(a, scale), F.avg_pool2d(b, scale)) if scale > 1 else (a, b)
        ga, gb = _gradient_magnitude(xs, kernel), _gradient_magnitude(ys, kernel)
        gms = (2 * ga * gb + GMS_C) / (ga.pow(2) + gb.pow(2) + GMS_C)
        maps.append(F.interpolate(gms, size=size, mode="bilinear", align_corners=False) if scale > 1 else gms)
    return 1 - torch.stack(maps).mean(0)[:, 0]


# --- the model ------------------------------------------------------------------------------------------------


@register("edgerec")
class EdgeRec(AnomalyModel):
    """EdgRec: edges of the (pseudo-anomalous in training) image -> U-Net -> image; colour + gradient difference.

    widths: the U-Net's channels per level (len(widths) - 1 poolings, so sides must be multiples of
    2^(len(widths) - 1)). Scores, each returned as score_<name>: "color" and "gradient" (top-k means of each
    smoothed term on its own) and "combined" (of their weighted sum, the paper's evaluation), which is
    `pred_score`. The map is the smoothed combined difference.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        anomaly_probability: float = 0.5,
        color_weight: float = 1.0,
        topk_fraction: float = 0.01,
        blur_sigma: float = 2.0,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 (gray) or 3 (RGB) for EdgeRec's colour difference; got {in_channels}")
        if not 0 <= anomaly_probability <= 1:
            raise ConfigError(f"anomaly_probability must be in [0, 1]; got {anomaly_probability}")
        if color_weight < 0:
            raise ConfigError(f"color_weight must be >= 0; got {color_weight}")
        if not 0 < topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1]; got {topk_fraction}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        self.network = EdgeUNet(in_channels, widths)
        self.size_multiple = 2 ** (len(widths) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The image restored from its edges."""
        check_image_size(images, self.size_multiple)
        return self.network(sobel_edges(images))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        corrupted = batch.image
        if self.training and self._config["anomaly_probability"] > 0:
            corrupted, _ = simulate_anomalies(batch.image, self._config["anomaly_probability"])
        recon = self(corrupted)
        l2 = F.mse_loss(recon, batch.image)
        ssim_loss = 1 - ssim(recon, batch.image, data_range=1.0)
        return {"loss": l2 + ssim_loss, "l2": l2, "ssim": ssim_loss}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self(images)
        sigma, fraction = self._config["blur_sigma"], self._config["topk_fraction"]
        color = gaussian_blur(color_difference(images, recon), sigma)
        gradient = gaussian_blur(msgms_difference(images, recon), sigma)
        anomaly_map = gradient + self._config["color_weight"] * color
        combined = top_k_mean(anomaly_map, fraction)
        return {"pred_score": combined, "anomaly_map": anomaly_map, "score_combined": combined,
                "score_color": top_k_mean(color, fraction), "score_gradient": top_k_mean(gradient, fraction)}

