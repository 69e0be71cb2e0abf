"""GANomaly: an adversarially trained encoder-decoder-encoder (Akcay et al., "GANomaly: Semi-supervised anomaly
detection via adversarial training", ACCV 2018).

Generator: an encoder G_E maps the image x to a latent z, a decoder G_D reconstructs x' = G_D(z), and a second
encoder E maps the reconstruction to z' = E(x'). Trained on normal images only, the generator learns to reconstruct
normal anatomy and to encode x and x' alike; for an image with a lesion, x' is pulled towards normal, so z' moves
away from z. The image score is the encoder loss |z - z'|^2 (paper, section 3.3).

The networks are the paper's DCGAN ones (`blocks="dcgan"`, the default): G_E, E and D are stacks of 4 x 4
stride-2 convolutions, batch norm (not on the first) and LeakyReLU(0.2); G_D mirrors them with 4 x 4 stride-2
transposed convolutions, batch norm and ReLU. `blocks="conv"` builds them from the autoencoder's blocks instead
(aeflow.nn.blocks.ConvEncoder / ConvDecoder: a 3 x 3 stride-2 convolution plus a 3 x 3 refinement convolution per
stage, 3 x 3 output convolution), what GANomaly used before the DCGAN networks: about twice the convolutions, kept
so that runs saved then still load (their config has no `blocks`, which reads as "conv").
The discriminator D separates x from x' with binary cross-entropy;
the generator is trained against it by feature matching on D's last feature map (paper, eq. 1), so
  loss_G = w_adv * |f(x) - f(x')|^2 + w_con * |x - x'|_1 + w_enc * |z - z'|^2   (paper weights 1, 50, 1),
  loss_D = BCE(D(x), 1) + BCE(D(x'), 0).

One optimiser, two players: `AnomalyModel.loss` returns a single loss that the training wrapper minimises with one
optimiser over all parameters, so `loss` returns loss_G + loss_D with the two kept apart by construction:
loss_D sees x' detached, so it reaches only D; loss_G's adversarial term evaluates D through
`torch.func.functional_call` with detached copies of D's parameters, so gradients flow through D into the generator
but never into D. Summing them therefore equals taking the two players' gradient steps at once.

Departures from the paper, each for a stated reason:
- The latent is a small spatial map (latent_channels x H/2^n x W/2^n, as in our autoencoder), not a 100-vector from
  a kernel-size-4 convolution, so any image size that is a multiple of 2^n works without an image-size option:
  a 1 x 1 convolution maps the last stage to it, and G_D starts with a 3 x 3 convolution (batch norm, ReLU) from
  it back to the last stage's width, where the paper's G_D starts with a 4 x 4 transposed convolution from 1 x 1.
- G_D ends in a sigmoid (images here are in 0..1), not the paper's tanh (images in -1..1); D's logit is the mean
  of a 1 x 1-convolution logit map, not a final 4 x 4 convolution, for the same size independence.
- The anomaly map, which the paper does not define, is the smoothed L1 residual |x - x'| averaged over channels.
- The paper re-initialises D when its loss collapses below 1e-5; this is left out, because re-initialising
  parameters from inside loss() would leave the shared optimiser's moment estimates stale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import ConvDecoder, ConvEncoder, check_image_size, gaussian_blur


BLOCKS = ("dcgan", "conv")


class DCGANEncoder(nn.Sequential):
    """The paper's (DCGAN) encoder stages: B x C x H x W -> B x widths[-1] x H/2^n x W/2^n, each stage a 4 x 4
    stride-2 convolution, batch norm (not on the first stage) and LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        stages, channels = [], in_channels
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            stages.append(nn.Sequential(*layers))
            channels = width
        super().__init__(*stages)
        self.out_channels = channels


class DCGANDecoder(nn.Sequential):
    """The paper's (DCGAN) generator stages from a spatial latent: a 3 x 3 convolution to widths[0] (batch norm,
    ReLU), then per further width a 4 x 4 stride-2 transposed convolution, batch norm and ReLU, and a last 4 x 4
    stride-2 transposed convolution to the image channels with a sigmoid: len(widths) doublings of the size."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))]
        for channels, width in zip(widths[:-1], widths[1:]):
            stages.append(nn.Sequential(nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
        stages.append(nn.Sequential(nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1),
                                    nn.Sigmoid()))
        super().__init__(*stages)


def _encoder(blocks: str, in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    return DCGANEncoder(in_channels, widths) if blocks == "dcgan" else ConvEncoder(in_channels, widths)


class Discriminator(nn.Module):
    """DCGAN critic: encoder stages -> one logit per image (the mean of a 1x1-conv logit map).

    forward returns (logits B, features B x C x h x w); the features are what the generator matches.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: str = "dcgan"):
        super().__init__()
        self.features = _encoder(blocks, in_channels, widths)
        self.classifier = nn.Conv2d(self.features.out_channels, 1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.classifier(features).flatten(1).mean(1), features


@register("ganomaly")
class GANomaly(AnomalyModel):
    """Encoder-decoder-encoder generator plus discriminator; pred_score = mean (z - z')^2 (the paper's score).

    widths: channels of the conv stages (each halves the size) shared by the encoders and D; latent_channels: width
    of the spatial latent z; w_adv, w_con, w_enc: loss weights (paper: 1, 50, 1); blur_sigma: smoothing of the map;
    blocks: "dcgan" (the paper's networks) or "conv" (the autoencoder's blocks, GANomaly's networks before).
    Also returned: score_latent (= pred_score) and score_residual (mean |x - x'|), for comparison.
    """

    options_of_older_runs = {"blocks": "conv"}

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_enc: float = 1.0,
        blur_sigma: float = 2.0,
        blocks: str = "dcgan",
    ):
        super().__init__()
        if blocks not in BLOCKS:
            raise ConfigError(f"blocks must be one of {', '.join(BLOCKS)}; got {blocks!r}")
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3; got {in_channels}")
        if min(w_adv, w_con, w_enc) < 0:
            raise ConfigError(f"loss weights must be >= 0; got w_adv={w_adv}, w_con={w_con}, w_enc={w_enc}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")

        def encoder() -> nn.Sequential:
            return nn.Sequential(_encoder(blocks, in_channels, widths), nn.Conv2d(widths[-1], latent_channels, 1))

        decoder = DCGANDecoder if blocks == "dcgan" else ConvDecoder
        self.encoder = encoder()  # G_E
        self.decoder = decoder(latent_channels, list(reversed(widths)), in_channels)  # G_D
        self.reencoder = encoder()  # E
        self.discriminator = Discriminator(in_channels, widths, blocks)
        self.size_multiple = 2 ** len(widths)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (x', z, z')."""
        check_image_size(images, self.size_multiple)
        z = self.encoder(images)
        recon = self.decoder(z)
        return recon, z, self.reencoder(recon)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.image
        recon, z, z_recon = self(x)

        # Discriminator: real vs. detached fake, so loss_D reaches D's parameters only.
        logits_real, features_real = self.discriminator(x)
        logits_fake, _ = self.discriminator(recon.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))

        # Generator: D evaluated with detached parameters, so the adversarial term reaches the generator only.
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        _, features_fake = functional_call(self.discriminator, frozen, (recon,))
        adversarial = F.mse_loss(features_fake, features_real.detach())
        contextual = F.l1_loss(recon, x)
        encoder = F.mse_loss(z_recon, z)
        c = self._config
        loss_g = c["w_adv"] * adversarial + c["w_con"] * contextual + c["w_enc"] * encoder
        return {
            "loss": loss_g + loss_d,
            "loss_g": loss_g,
            "loss_d": loss_d,
            "adversarial": adversarial,
            "contextual": contextual,
            "encoder": encoder,
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        recon, z, z_recon = self(images)
        latent = (z - z_recon).pow(2).flatten(1).mean(1)
        residual = (images - recon).abs().mean(1)
        return {
            "pred_score": latent,
            "score_latent": latent,
            "score_residual": residual.flatten(1).mean(1),
            "anomaly_map": gaussian_blur(residual, self._config["blur_sigma"]),
        }

