"""DRAEM: a discriminatively trained reconstruction embedding for surface anomaly detection (Zavrtanik et al.,
ICCV 2021, arXiv:2108.07610), optionally with SSPCAB (Ristea et al., "Self-Supervised Predictive Convolutional
Attentive Block for Anomaly Detection", CVPR 2022, arXiv:2111.09099).

Training needs no real anomalies: it makes its own. A Perlin-noise mask M cuts irregular regions out of a normal
image I and fills them with an anomaly source A: I_a = (1 - M) I + (1 - beta) M I + beta M A, beta ~ U(0.1, 1).
A reconstructive sub-network learns to restore I from I_a (L2 + SSIM loss); a discriminative U-Net sees I_a next to
its reconstruction and learns to segment M (focal loss). At test time the segmentation is the anomaly map and the
maximum of its local mean the image score.

Deviation from the paper, on purpose: DRAEM takes A from the DTD texture data set, which is not available
offline. Here A is, at random, a smooth Perlin-noise texture or another image of the batch flipped upside down and
left to right, so the sources are either foreign textures or displaced real anatomy.

With `sspcab=True` the SSPCAB block sits in the reconstructive network's bottleneck: convolutions that see only
the four corners of a receptive field whose centre is masked, then channel attention; an extra loss
(weight 0.1, as in the SSPCAB paper for DRAEM) makes the block predict the masked centre, i.e. its own input.
The corners sit kernel_size + dilation away from the centre, so the bottleneck (H/16) needs at least 4 x 4 (64 px).

Status: on the 32 px synthetic phantoms with the paper's anomaly probability 0.5 the segmentation starts to work
after ~350 Adam steps (pixel AUROC about 0.87-0.96 at 400) but the image score swings from one checkpoint to the
next (0.6-0.85). With anomaly_probability=1 (every training image augmented) 300 steps give pixel AUROC ~0.96 and
image AUROC 0.75-0.85 over three seeds (tests/models/test_baselines.py). The paper trains 700 epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import ConvDecoder, ConvEncoder, UNet, check_image_size, perlin_noise

# --- anomaly simulation ----------------------------------------------------------------------------------------


def simulate_anomalies(
    images: torch.Tensor, probability: float = 0.5, threshold: float = 0.5, max_cells_log2: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented images, masks B x H x W): each image gets a simulated anomaly with `probability`.

    The mask is Perlin noise (2^k cells per side, k uniform in [0, max_cells_log2], independently per side)
    above `threshold`; the source is a Perlin texture or a flipped batch neighbour (see the module docstring).
    """
    b, c, h, w = images.shape
    device = images.device
    augmented, masks = images.clone(), torch.zeros(b, h, w, device=device)
    flipped_neighbours = images.roll(1, dims=0).flip(-1, -2)
    for i in range(b):
        if torch.rand(()) >= probability:
            continue
        cells = tuple(2 ** int(torch.randint(0, max_cells_log2 + 1, ())) for _ in range(2))
        mask = (perlin_noise(1, h, w, cells, device=device)[0] > threshold).float()
        if torch.rand(()) < 0.5:
            texture_cells = tuple(int(torch.randint(2, 9, ())) for _ in range(2))
            source = perlin_noise(c, h, w, texture_cells, device=device)
            low, high = source.amin((1, 2), keepdim=True), source.amax((1, 2), keepdim=True)
            source = (source - low) / (high - low + 1e-8)
        else:
            source = flipped_neighbours[i]
        beta = 0.1 + 0.9 * torch.rand((), device=device)
        augmented[i] = images[i] * (1 - mask) + (1 - beta) * images[i] * mask + beta * source * mask
        masks[i] = mask
    return augmented, masks


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of 2-class logits B x 2 x H x W against a B x H x W mask: anomalous pixels are
    few, and the (1 - p_t)^gamma factor keeps the many easy normal pixels from dominating."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


# --- SSPCAB --------------------------------------------------------------------------------------------------


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attentive block (Ristea et al. 2022), channels -> channels.

    Four k x k convolutions look at the corners of a (2k + 2d + 1)-sized receptive field whose centre (with a
    d-pixel gap) is hidden; their summed, ReLU'd output is reweighted per channel by squeeze-and-excitation.
    """

    def __init__(self, channels: int, kernel_size: int = 1, dilation: int = 1, reduction: int = 8):
        super().__init__()
        self.pad = kernel_size + dilation
        self.offset = kernel_size + 2 * dilation + 1
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size) for _ in range(4))
        hidden = max(1, channels // reduction)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (self.pad,) * 4)
        o = self.offset
        corners = (
            padded[..., :-o, :-o],
            padded[..., o:, :-o],
            padded[..., :-o, o:],
            padded[..., o:, o:],
        )
        out = F.relu(sum(conv(view) for conv, view in zip(self.corners, corners)))
        weights = self.excitation(out.mean((2, 3)))
        return out * weights[:, :, None, None]


# --- the two sub-networks -------------------------------------------------------------------------------------


class ReconstructiveNetwork(nn.Module):
    """Encoder-decoder without skips (so it cannot copy the anomaly through): I_a -> I_r.

    forward returns the reconstruction and SSPCAB's self-supervised loss (zero without SSPCAB).
    """

    def __init__(self, channels: int, widths: Sequence[int], sspcab: bool):
        super().__init__()
        self.encoder = ConvEncoder(channels, widths)
        self.sspcab = SSPCAB(widths[-1]) if sspcab else None
        self.decoder = ConvDecoder(widths[-1], list(reversed(widths)), channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(images)
        if self.sspcab is None:
            return self.decoder(z), z.new_zeros(())
        predicted = self.sspcab(z)
        return self.decoder(predicted), F.mse_loss(predicted, z)


class DiscriminativeUNet(UNet):
    """U-Net on [I_a, I_r] (2C channels) -> 2-class logits per pixel (normal, anomalous)."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__(in_channels, 2, widths)


# --- the model ------------------------------------------------------------------------------------------------


@register("draem")
class DRAEM(AnomalyModel):
    """DRAEM; widths are (w, 2w, 4w, 8w) for both sub-networks with w = `base_width` (the paper: 128 and 64).

    score_window: side of the mean filter applied to the segmentation before taking the image score's maximum
    (the paper: 21 at 256 px; scale it with the image size). sspcab: add the SSPCAB block and its loss.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_width: int = 32,
        sspcab: bool = False,
        sspcab_weight: float = 0.1,
        anomaly_probability: float = 0.5,
        score_window: int = 21,
    ):
        super().__init__()
        if score_window < 1 or score_window % 2 == 0:
            raise ConfigError(f"score_window must be an odd number >= 1; got {score_window}")
        if not 0 < anomaly_probability <= 1:
            raise ConfigError(f"anomaly_probability must be in (0, 1]; got {anomaly_probability}")
        widths = [base_width * 2**i for i in range(4)]
        self.reconstructive = ReconstructiveNetwork(in_channels, widths, sspcab)
        self.discriminative = DiscriminativeUNet(2 * in_channels, widths)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, segmentation logits B x 2 x H x W and the SSPCAB loss."""
        check_image_size(images, 16)
        recon, sspcab_loss = self.reconstructive(images)
        return recon, self.discriminative(torch.cat([images, recon], dim=1)), sspcab_loss

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        augmented, masks = simulate_anomalies(batch.image, self._config["anomaly_probability"])
        recon, logits, sspcab_loss = self(augmented)
        l2 = F.mse_loss(recon, batch.image)
        ssim_loss = 1 - ssim(recon, batch.image, data_range=1.0)
        focal = focal_loss(logits, masks)
        total = l2 + ssim_loss + focal + self._config["sspcab_weight"] * sspcab_loss
        return {"loss": total, "l2": l2, "ssim": ssim_loss, "focal": focal, "sspcab": sspcab_loss}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _, logits, _ = self(images)
        anomaly_map = logits.softmax(dim=1)[:, 1]
        window = self._config["score_window"]
        smoothed = F.avg_pool2d(anomaly_map[:, None], window, stride=1, padding=window // 2)
        return {"pred_score": smoothed.flatten(1).amax(1), "anomaly_map": anomaly_map}

