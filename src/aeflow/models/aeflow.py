"""AE-FLOW (Zhao, Ding, Zhang, ICLR 2023): an autoencoder whose bottleneck is a normalizing flow.

Read top to bottom like the paper's method section:

1. Encoder: an ImageNet backbone cut at stride 16 maps the image x to features z (C x H/16 x W/16).
2. Flow: K invertible steps map z to z', trained so that z' of normal images is standard normal.
3. Decoder: four 2x2 stride-2 transposed convolutions reconstruct x' from z'.
4. Loss: alpha * L_flow + (1 - alpha) * L_recon, trained on normal images only.
5. Score: S = beta * S_flow + (1 - beta) * S_recon; pixel map from the reconstruction residual.

Where this file departs from the paper, it says so and why (see `score_mode`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.backbones import create_backbone
from aeflow.nn.blocks import gaussian_blur
from aeflow.nn.flow import SUBNETS, FlowBottleneck, bits_per_dim, standard_normal_log_prob

SCORE_MODES = ("paper", "standardized")
MAP_MODES = ("residual", "flow", "fused")
# Order of the per-component calibration buffers.
SCORE_COMPONENTS = ("score_flow", "score_recon", "score_flow_nll")


class Decoder(nn.Sequential):
    """z' (C x h x w) -> x' (image channels x 16h x 16w).

    Four 2x2 stride-2 transposed convolutions, C -> 512 -> 256 -> 64 -> image channels for the paper's
    1024-channel encoder; each of the first three is followed by 3x3 conv + BatchNorm + ReLU. The widths
    stay 512/256/64 for smaller encoders too (their first block then widens the map, which costs little at
    stride 16). A sigmoid ends it because images live in [0, 1].
    """

    def __init__(self, feature_channels: int, image_channels: int, widths: tuple[int, int, int] = (512, 256, 64)):
        layers: list[nn.Module] = []
        channels = feature_channels
        for width in widths:
            layers += [
                nn.ConvTranspose2d(channels, width, 2, stride=2),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        layers += [nn.ConvTranspose2d(channels, image_channels, 2, stride=2), nn.Sigmoid()]
        super().__init__(*layers)


@register("aeflow")
class AEFlow(AnomalyModel):
    """AE-FLOW for images of any side that is a multiple of 16 (tested 64 to 512).

    Options beyond the paper:
    - `freeze_encoder`: the paper does not say whether its encoder is trained; both are supported. Frozen is
      the default because a trained encoder can shrink its features to raise the flow's likelihood (its own
      Jacobian is not in the loss): measured on PneumoniaMNIST, test AUROC 0.23 trained vs 0.71 frozen.
    - `score_mode="standardized"` (default) z-scores each score component with statistics of normal
      validation images (see `calibrate`) before the beta blend; `"paper"` blends the raw components.
      Why: the paper's S_flow = -exp(mean log N(z')) lives in about [-0.4, 0] with normal-to-normal spread
      of a few 1e-3, while -SSIM spreads over tenths, so the raw blend is ruled by whichever term happens
      to vary more, not by beta (the guide measured the raw blend below the flow score alone on
      PneumoniaMNIST). The standardized blend uses the per-dimension NLL of z' as its flow component: it is
      a monotone function of S_flow (same ranking) that does not saturate for strong anomalies.
    - `map_mode`: "residual" (paper: smoothed |x - x'|), "flow" (up-sampled per-position NLL of z') or
      "fused" (mean of both after z-scoring each with the calibration statistics).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        freeze_encoder: bool = True,
        in_channels: int = 1,
        flow_steps: int = 8,
        subnet: str = "resnet",
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        decoder_widths: tuple[int, int, int] | list[int] = (512, 256, 64),
        alpha: float = 0.5,
        beta: float = 0.9,
        score_mode: str = "standardized",
        map_mode: str = "residual",
    ):
        super().__init__()
        if subnet not in SUBNETS:
            raise ConfigError(f"subnet must be one of {SUBNETS}, got {subnet!r}")
        if score_mode not in SCORE_MODES:
            raise ConfigError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if map_mode not in MAP_MODES:
            raise ConfigError(f"map_mode must be one of {MAP_MODES}, got {map_mode!r}")
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if len(decoder_widths) != 3:
            raise ConfigError(f"decoder_widths needs three widths, got {list(decoder_widths)}")
        self.alpha, self.beta = alpha, beta
        self.score_mode, self.map_mode = score_mode, map_mode

        self.encoder = create_backbone(backbone, pretrained=pretrained, weights=weights, frozen=freeze_encoder)
        channels = self.encoder.out_channels
        self.flow = FlowBottleneck(channels, flow_steps, subnet, hidden_ratio, clamp)
        self.decoder = Decoder(channels, in_channels, tuple(decoder_widths))

        # Statistics of normal validation images (see `calibrate`); buffers, so they travel with the weights.
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("score_mean", torch.zeros(len(SCORE_COMPONENTS)))
        self.register_buffer("score_std", torch.ones(len(SCORE_COMPONENTS)))
        self.register_buffer("map_mean", torch.zeros(2))  # residual map, flow map
        self.register_buffer("map_std", torch.ones(2))

    # 1-3. Encoder, flow, decoder --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (z', log|det dz'/dz| per sample, reconstruction x')."""
        if x.ndim != 4 or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ConfigError(f"AE-FLOW needs B x C x H x W images with H and W multiples of 16, got {tuple(x.shape)}")
        z = self.encoder(x)
        z_prime, log_det = self.flow(z)
        return z_prime, log_det, self.decoder(z_prime)

    # 4. Loss -------------------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L = alpha * L_flow + (1 - alpha) * MSE(x, x').

        L_flow is the flow's negative log-likelihood of z in bits per latent dimension:
        (-log N(z'; 0, I) - log|det|) / (C * h * w * ln 2). Unscaled, the sum over ~260k dimensions would
        swamp the MSE term; bits/dim is the scaling the guide's measurements used.
        """
        x = batch.image
        z_prime, log_det, x_rec = self(x)
        log_pz = standard_normal_log_prob(z_prime.float()).flatten(1).sum(1)
        loss_flow = bits_per_dim(log_pz, log_det.float(), z_prime[0].numel()).mean()
        loss_recon = F.mse_loss(x_rec.float(), x.float())
        loss = self.alpha * loss_flow + (1 - self.alpha) * loss_recon
        return {"loss": loss, "loss_flow": loss_flow, "loss_recon": loss_recon}

    # 5. Scores -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each score component on its own (B,), higher = more anomalous, plus the two raw pixel maps.

        score_flow: the paper's -exp(mean over dimensions of log N(z'; 0, I)).
        score_flow_nll: -mean log N(z'; 0, I), the per-dimension NLL of z' in nats.
        score_recon: the paper's -SSIM(x, x').
        map_residual / map_flow (B x H x W): smoothed |x - x'| averaged over channels / the per-position
        NLL of z' up-sampled to the image.
        reconstruction: x' itself, for the report's gallery.
        """
        x = images.float()
        z_prime, _, x_rec = self(x)
        log_p = standard_normal_log_prob(z_prime.float())  # B x C x h x w
        mean_log_p = log_p.flatten(1).mean(1)
        sigma = 4.0 * x.shape[-1] / 256  # 4 px at 256 px, as PaDiM and PatchCore smooth their maps
        flow_map = F.interpolate(-log_p.mean(1, keepdim=True), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {
            "score_flow": -torch.exp(mean_log_p),
            "score_recon": -ssim(x, x_rec.float(), data_range=1.0, size_average=False, win_size=_ssim_window(x)),
            "score_flow_nll": -mean_log_p,
            "map_residual": gaussian_blur((x - x_rec).abs().mean(1), sigma),
            "map_flow": gaussian_blur(flow_map[:, 0], sigma),
            "reconstruction": x_rec,
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.score_components(images)
        needs_calibration = self.score_mode == "standardized" or self.map_mode == "fused"
        if needs_calibration and not bool(self.calibrated):
            raise ConfigError(
                f"score_mode={self.score_mode!r} / map_mode={self.map_mode!r} need statistics of normal images: "
                "call calibrate() with normal validation images first (training does this for you)"
            )
        if self.score_mode == "paper":
            score = self.beta * parts["score_flow"] + (1 - self.beta) * parts["score_recon"]
        else:
            z = self._standardize_scores(parts)
            score = self.beta * z["score_flow_nll"] + (1 - self.beta) * z["score_recon"]
        residual, flow = parts.pop("map_residual"), parts.pop("map_flow")
        if self.map_mode == "residual":
            anomaly_map = residual
        elif self.map_mode == "flow":
            anomaly_map = flow
        else:
            z_residual = (residual - self.map_mean[0]) / self.map_std[0]
            z_flow = (flow - self.map_mean[1]) / self.map_std[1]
            anomaly_map = 0.5 * (z_residual + z_flow)
        return {"pred_score": score, "anomaly_map": anomaly_map, **parts}

    def _standardize_scores(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: (parts[name] - self.score_mean[i]) / self.score_std[i] for i, name in enumerate(SCORE_COMPONENTS)
        }

    @torch.no_grad()
    def calibrate(self, normal_images: Iterable[Batch | torch.Tensor]) -> None:
        """Store mean and std of each score component and of both pixel maps over NORMAL images.

        `normal_images` yields Batches (anomalous ones, label 1, are dropped so they never shape the
        normal statistics) or image tensors, all taken as normal. Use validation images, never test ones.
        """
        device = self.score_mean.device
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in SCORE_COMPONENTS}
        map_sums = torch.zeros(2, 3, dtype=torch.float64)  # per map: count, sum, sum of squares
        was_training = self.training
        self.eval()
        for item in normal_images:
            images = item.image[item.label <= 0] if isinstance(item, Batch) else item
            if len(images) == 0:
                continue
            parts = self.score_components(images.to(device))
            for name in SCORE_COMPONENTS:
                scores[name].append(parts[name].double().cpu())
            for i, key in enumerate(("map_residual", "map_flow")):
                values = parts[key].double().cpu()
                map_sums[i] += torch.stack([torch.tensor(values.numel()), values.sum(), values.pow(2).sum()])
        self.train(was_training)
        collected = {name: torch.cat(values) if values else torch.empty(0) for name, values in scores.items()}
        if len(collected["score_flow"]) < 2:
            raise ConfigError("calibrate() needs at least two normal images")
        for i, name in enumerate(SCORE_COMPONENTS):
            values = collected[name]
            self.score_mean[i] = values.mean()
            self.score_std[i] = values.std().clamp_min(1e-12)
        count, total, total_sq = map_sums.unbind(1)
        mean = total / count
        self.map_mean.copy_(mean)
        self.map_std.copy_((total_sq / count - mean.pow(2)).clamp_min(1e-24).sqrt())
        self.calibrated.fill_(True)


def _ssim_window(images: torch.Tensor) -> int:
    """SSIM's usual 11-pixel window, or the largest odd window that fits a smaller image."""
    side = min(images.shape[-2:])
    return min(11, side if side % 2 else side - 1)

