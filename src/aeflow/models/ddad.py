"""DDAD: anomaly detection with conditioned denoising diffusion models (Mousakhan, Brox, Tayyub, "Anomaly
Detection with Conditioned Denoising Diffusion Models", 2023, arXiv:2305.15956).

Read top to bottom like the paper's method section:

1. Diffusion model: a denoising U-Net eps_theta(x_t, t) is trained on normal images with the DDPM objective
   ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2, a linear noise schedule beta_1..beta_T
   (1e-4 to 0.02, T = 1000, as DDPM) and abar_t = prod_{s <= t} (1 - beta_s).
2. Conditioned denoising: at test time the image y = x_0 is noised to step t (`test_t`) by the closed form
   q(x_t | x_0) and denoised back along `test_steps` DDIM steps, each conditioned on the input image:
       eps = eps_theta(x_t, t),   y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps,
       eps_hat = eps - w sqrt(1 - abar_t) (y_t - x_t),
       x_{t'} = sqrt(abar_t') (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) + sqrt(1 - abar_t') eps_hat.
   The condition pulls the trajectory towards the input image, so normal detail is kept while the model's prior
   replaces what it never saw in normal images; w weighs it (w = 0 is plain DDIM reconstruction).
3. Anomaly map: a pixel distance D_p = mean over channels of |x_0 - x_hat_0| and a feature distance
   D_f = sum over the backbone's stages j of 1 - cos(phi_j(x_0), phi_j(x_hat_0)) (up-sampled to the image), with
   phi a pretrained backbone; combined as D = D_f + v (max D_f / max D_p) D_p, smoothed by a Gaussian; the image
   score is the maximum of the map.
4. Domain adaptation (the paper's optional fine-tuning of phi): minimise sum_j 1 - cos(phi_j(x), phi_j(x_hat))
   over normal images x and their conditioned reconstructions x_hat, plus lambda_DL times the distance
   sum_j 1 - cos(phi_j(x), phibar_j(x)) to the frozen pretrained backbone phibar, which keeps phi from collapsing.

Departures from the paper, and why:

- Sizes: a small U-Net (`widths`, residual blocks with a sinusoidal time embedding, no attention) instead of the
  paper's large guided-diffusion U-Net, and few test steps (`test_steps`, default 5, from test_t = 250), so that
  training and scoring run on a CPU at 32-64 px.
- `train_t_max` (default None: all T steps, as the paper) lets training draw t only up to that step; scoring
  never visits steps above test_t, so on a CPU budget train_t_max = test_t spends every training step where the
  test trajectory goes (the model is then only a denoiser up to train_t_max, not a generator from pure noise).
- Backbone: EfficientNet-Lite0 (aeflow.nn.backbones, its stride-4, -8 and -16 stages) instead of the paper's
  Wide-ResNet-50-2, because its ImageNet weights ship with a pip package and work offline.
- The ratio max D_f / max D_p: the paper takes the maxima over the batch of test images it scores, which makes an
  image's map depend on the other test images. Here `calibrate` fixes it from NORMAL validation images (training
  calls it); an uncalibrated model (e.g. during the training loop's validation pass) uses the images of the call.
- Domain adaptation is off by default (`fine_tune_steps=0`): it needs its own training phase that the shared
  training loop does not have. With fine_tune_steps > 0, `calibrate` first fine-tunes phi (BatchNorm statistics
  kept) on the normal images it is given (the validation normals in training; the paper uses the training
  images), then fixes the ratio with the adapted phi.
- At 32 px (the phantom tests) the backbone's stride-16 stage is a 2 x 2 map and the feature distance ranks the
  phantoms' lesions below chance, while the pixel distance separates them; the tests use v = 8 there
  (tests/models/test_reconstruction_methods.py gives the numbers). v = 1 stays the default.
- Noise: the start x_t of the denoising uses the same fixed noise (`noise_seed`) for every image, so that scoring
  is deterministic and an image's score does not depend on its batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages, check_image_size, gaussian_blur

# --- 1. the diffusion model -------------------------------------------------------------------------------------


def linear_alpha_bars(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """abar_0 .. abar_T (T + 1 values, float64): abar_0 = 1 (the clean image), abar_t = prod_{s=1}^t (1 - beta_s)
    with beta_s linear from beta_start to beta_end."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), (1 - betas).cumprod(0)])


def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); alpha_bar is abar_t per image (B,)."""
    a = alpha_bar.to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (B,) time steps, B x dim (Vaswani et al. 2017, as DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, with a residual connection."""

    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(time))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class DenoisingUNet(nn.Module):
    """eps_theta(x_t, t): a U-Net over len(widths) levels (one residual block each way, skips between them)."""

    def __init__(self, channels: int, widths: Sequence[int]):
        super().__init__()
        self.embedding_dim, time_dim = widths[0], 4 * widths[0]
        self.time = nn.Sequential(nn.Linear(widths[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down, self.downsample, previous = nn.ModuleList(), nn.ModuleList(), widths[0]
        for level, width in enumerate(widths):
            self.down.append(ResidualBlock(previous, width, time_dim))
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            previous = width
        self.middle = ResidualBlock(previous, previous, time_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            self.up.append(ResidualBlock(previous + width, width, time_dim))
            next_width = widths[level - 1] if level else width
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(width, next_width, 3, padding=1)) if level else nn.Identity())
            previous = next_width
        self.head = nn.Sequential(nn.GroupNorm(min(8, widths[0]), widths[0]), nn.SiLU(),
                                  nn.Conv2d(widths[0], channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time(timestep_embedding(t, self.embedding_dim))
        h, skips = self.stem(x), []
        for block, down in zip(self.down, self.downsample):
            h = block(h, time)
            skips.append(h)
            h = down(h)
        h = self.middle(h, time)
        for block, up in zip(self.up, self.upsample):
            h = up(block(torch.cat([h, skips.pop()], dim=1), time))
        return self.head(h)


# --- the model ------------------------------------------------------------------------------------------------


@register("ddad")
class DDAD(AnomalyModel):
    """DDAD with a small U-Net; images are mapped from [0, 1] to [-1, 1] for the diffusion.

    test_t: the step the test image is noised to; test_steps: DDIM steps back to 0 (evenly spaced); w: the
    conditioning weight; v: the pixel distance's weight in the map. Scores, each returned as score_<name>:
    "pixel" (max of the smoothed D_p), "feature" (max of the smoothed D_f); `pred_score` is the maximum of the
    smoothed combined map, the paper's score. fine_tune_steps / fine_tune_lr / distillation_weight: the domain
    adaptation (off by default, see the module docstring).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        test_t: int = 250,
        test_steps: int = 5,
        train_t_max: int | None = None,
        w: float = 3.0,
        v: float = 1.0,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        weights: str | None = None,
        blur_sigma: float = 2.0,
        noise_seed: int = 0,
        fine_tune_steps: int = 0,
        fine_tune_lr: float = 1e-4,
        distillation_weight: float = 0.1,
    ):
        super().__init__()
        if timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ConfigError(f"need timesteps >= 1 and 0 < beta_start <= beta_end < 1; got {timesteps}, "
                              f"{beta_start}, {beta_end}")
        if not 1 <= test_t <= timesteps:
            raise ConfigError(f"test_t must be in [1, timesteps={timesteps}]; got {test_t}")
        if train_t_max is not None and not test_t <= train_t_max <= timesteps:
            raise ConfigError(f"train_t_max must be in [test_t={test_t}, timesteps={timesteps}] or None; got {train_t_max}")
        if not 1 <= test_steps <= test_t:
            raise ConfigError(f"test_steps must be in [1, test_t={test_t}]; got {test_steps}")
        for name, value in (("w", w), ("v", v), ("blur_sigma", blur_sigma), ("fine_tune_steps", fine_tune_steps),
                            ("distillation_weight", distillation_weight)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0; got {value}")
        self.unet = DenoisingUNet(in_channels, widths)
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.size_multiple = max(2 ** (len(widths) - 1), 16)  # the backbone's stride-16 stage
        self.register_buffer("alpha_bar", linear_alpha_bars(timesteps, beta_start, beta_end).float(), persistent=False)
        # max D_f / max D_p over normal validation images (`calibrate`); NaN until then.
        self.register_buffer("distance_ratio", torch.tensor(float("nan")))

    # 1. training: the DDPM objective
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        check_image_size(batch.image, self.size_multiple)
        x0 = 2 * batch.image - 1
        t_max = self._config["train_t_max"] or len(self.alpha_bar) - 1
        t = torch.randint(1, t_max + 1, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        predicted = self.unet(q_sample(x0, self.alpha_bar[t], noise), t)
        return {"loss": F.mse_loss(predicted, noise)}

    # 2. conditioned denoising
    def trajectory(self) -> list[int]:
        """The DDIM steps test_t = tau_S > ... > tau_0 = 0."""
        cfg = self._config
        steps = torch.linspace(cfg["test_t"], 0, cfg["test_steps"] + 1).round().long().tolist()
        return list(dict.fromkeys(steps))  # rounding can repeat a step at tiny test_t

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x_hat_0 of images in [0, 1], also in [0, 1]."""
        check_image_size(images, self.size_multiple)
        y = 2 * images - 1
        generator = torch.Generator(device="cpu").manual_seed(self._config["noise_seed"])
        noise = torch.randn(y.shape[1:], generator=generator).to(y).expand_as(y)
        steps, w = self.trajectory(), self._config["w"]
        x = q_sample(y, self.alpha_bar[steps[0]].expand(len(y)), noise)
        for t, t_next in zip(steps[:-1], steps[1:]):
            a, a_next = self.alpha_bar[t], self.alpha_bar[t_next]
            eps = self.unet(x, torch.full((len(x),), t, device=x.device))
            y_t = a.sqrt() * y + (1 - a).sqrt() * eps
            eps_hat = eps - w * (1 - a).sqrt() * (y_t - x)
            x0_hat = (x - (1 - a).sqrt() * eps_hat) / a.sqrt()
            x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps_hat
        return ((x + 1) / 2).clamp(0, 1)

    # 3. anomaly map
    def feature_distance(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """D_f: sum over stages of 1 - cosine similarity of the features, up-sampled to B x H x W."""
        size = images.shape[-2:]
        total = 0
        for a, b in zip(self.features(images), self.features(recon)):
            distance = 1 - F.cosine_similarity(a, b, dim=1)
            total = total + F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return total

    @torch.no_grad()
    def distances(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_p, D_f), each B x H x W."""
        recon = self.reconstruct(images)
        return (images - recon).abs().mean(1), self.feature_distance(images, recon)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel, feature = self.distances(images)
        ratio = self.distance_ratio
        if torch.isnan(ratio):  # uncalibrated: the paper's ratio over the images at hand
            ratio = feature.max() / pixel.max().clamp_min(1e-12)
        sigma = self._config["blur_sigma"]
        anomaly_map = gaussian_blur(feature + self._config["v"] * ratio * pixel, sigma)
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map,
                "score_pixel": gaussian_blur(pixel, sigma).flatten(1).amax(1),
                "score_feature": gaussian_blur(feature, sigma).flatten(1).amax(1)}

    @torch.no_grad()
    def calibrate(self, images: Iterable[Batch | torch.Tensor]) -> None:
        """Fix max D_f / max D_p from the NORMAL images of `images` (Batches, label <= 0 marks the normal ones, or
        image tensors, all taken as normal), after the domain adaptation when fine_tune_steps > 0."""
        device = self.distance_ratio.device
        normal = []
        for item in images:
            batch_images = item.image if isinstance(item, Batch) else item
            keep = item.label <= 0 if isinstance(item, Batch) else torch.ones(len(item), dtype=torch.bool)
            if keep.any():
                normal.append(batch_images[keep.to(batch_images.device)].to(device))
        if sum(len(x) for x in normal) < 2:
            raise ConfigError("calibrate() needs at least two normal images")
        was_training = self.training
        self.eval()
        if self._config["fine_tune_steps"]:
            with torch.enable_grad():
                self.adapt_features(normal)
        pixel_max = feature_max = 0.0
        for batch_images in normal:
            pixel, feature = self.distances(batch_images)
            pixel_max, feature_max = max(pixel_max, float(pixel.max())), max(feature_max, float(feature.max()))
        self.distance_ratio.fill_(feature_max / max(pixel_max, 1e-12))
        self.train(was_training)

    # 4. domain adaptation
    def adapt_features(self, batches: list[torch.Tensor]) -> list[float]:
        """Fine-tune phi for fine_tune_steps Adam steps over `batches` of normal images; returns the losses."""
        reference = copy.deepcopy(self.features)
        backbone = self.features.backbone
        backbone.requires_grad_(True)  # BatchNorm statistics stay fixed: the backbone stays in eval mode
        optimizer = torch.optim.Adam(backbone.parameters(), lr=self._config["fine_tune_lr"])
        reconstructions = [self.reconstruct(x) for x in batches]
        losses = []
        for step in range(self._config["fine_tune_steps"]):
            x, recon = batches[step % len(batches)], reconstructions[step % len(batches)]
            adapted = self.features(x)
            with torch.no_grad():
                pretrained = reference(x)
            match = sum((1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(adapted, self.features(recon)))
            keep = sum((1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(adapted, pretrained))
            loss = match + self._config["distillation_weight"] * keep
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        backbone.requires_grad_(False)
        return losses
