"""Convolutional autoencoder: the plainest reconstruction baseline.

Trained to reproduce normal images through a narrow bottleneck, the autoencoder learns what normal anatomy looks
like; a lesion it never saw comes back blurred towards normal, so the residual |x - x'|^2 is the anomaly map and a
summary of it the image score (see e.g. Baur et al., "Autoencoders for unsupervised anomaly segmentation in brain
MR images: a comparative study", MedIA 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import (
    RECONSTRUCTION_SCORES,
    ConvDecoder,
    ConvEncoder,
    check_image_size,
    check_score_options,
    reconstruction_scores,
)


@register("ae")
class AutoEncoder(AnomalyModel):
    """Conv encoder (stride 2^len(widths)) -> 1x1 conv to `latent_channels` -> mirrored conv decoder.

    The bottleneck is spatial (latent_channels x H/16 x W/16 with the default four stages), so any input size that
    is a multiple of 16 works; a small `latent_channels` keeps it narrow enough that lesions are not copied through.
    score: which image score is `pred_score` - "mse" (mean squared residual), "topk" (mean of the highest
    `topk_fraction` of the smoothed residual map; small lesions barely move the mean) or "ssim" (-SSIM).
    All three are returned as score_<name>.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        score: str = "topk",
        topk_fraction: float = 0.01,
        blur_sigma: float = 2.0,
    ):
        super().__init__()
        check_score_options(score, RECONSTRUCTION_SCORES, topk_fraction, blur_sigma)
        self.encoder = nn.Sequential(ConvEncoder(in_channels, widths), nn.Conv2d(widths[-1], latent_channels, 1))
        self.decoder = ConvDecoder(latent_channels, list(reversed(widths)), in_channels)
        self.size_multiple = 2 ** len(widths)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_size(images, self.size_multiple)
        return self.decoder(self.encoder(images))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(batch.image), batch.image)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = reconstruction_scores(
            images, self(images), blur_sigma=self._config["blur_sigma"], topk_fraction=self._config["topk_fraction"]
        )
        out["pred_score"] = out[f"score_{self._config['score']}"]
        return out

