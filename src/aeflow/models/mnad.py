"""MNAD: memory-guided normality for anomaly detection (Park, Noh, Ham, "Learning Memory-guided Normality for
Anomaly Detection", CVPR 2020, arXiv:2003.13228), its reconstruction variant.

Read top to bottom like the paper's method section:

1. Encoder: the image is encoded into an H/16 x W/16 map of queries q^k (C channels each, L2-normalised); every
   spatial position is one query.
2. Memory read: M memory items p_m (unit vectors, "prototypical features of normal patterns") are read with
   attention: w^k_m = softmax_m(p_m^T q^k), p_hat^k = sum_m w^k_m p_m, and the decoder sees the
   concatenation [q^k, p_hat^k] (2C channels).
3. Memory update (training only): every query votes for its nearest item; with v^k_m = softmax over the queries k
   of p_m^T q^k and U_m the queries whose nearest item is m,
   p_m <- f(p_m + sum_{k in U_m} v'^k_m q^k), v'^k_m = v^k_m / max_{k' in U_m} v^{k'}_m, f the L2 norm.
   The items are updated by this rule, not by gradient descent.
4. Loss: L = L_rec + lambda_c L_compact + lambda_s L_separate: the squared reconstruction error; the
   feature compactness loss ||q^k - p_p||^2 (p_p the nearest item: queries gather around their prototype); the
   feature separateness loss [||q^k - p_p||^2 - ||q^k - p_n||^2 + alpha]_+ (p_n the second nearest: items stay
   apart), margin alpha = 1; lambda_c = lambda_s = 0.1, the authors' released defaults.
5. Score: P = PSNR(I_hat, I) = 10 log10(max(I_hat)^2 / MSE) and D = mean_k ||q^k - p_p||^2;
   S = lambda (1 - g(P)) + (1 - lambda) g(D), g a min-max normalisation; lambda = 0.6, the released default. The pixel map is the
   (smoothed) reconstruction residual.

Departures from the paper, and why:

- The paper min-max normalises P and D over each test video, i.e. with statistics of the test set itself. Here g
  uses the minimum and maximum over NORMAL validation images (`calibrate`; training calls it with the validation
  split, which holds training normals when it has no normal images of its own), so a test image's score never
  depends on the other test images; test anomalies may then fall outside [0, 1], which is no problem for ranking
  or for a threshold fitted on validation. 1 - g(P) is computed as g(-P), the min-max of `score_psnr` = -PSNR.
- The paper also updates the memory at test time with frames whose score is below a threshold. Here the memory is
  fixed after training, so that scoring is stateless (an image's score does not depend on which images were
  scored before it) and a saved run scores like the trained model.
- The encoder/decoder are the conv blocks of aeflow.nn.blocks (the plain AE's), without skip connections, which
  the paper also removes for its reconstruction task; C = widths[-1] (the paper: 512) and M = 10 (the paper).
- The losses are means over queries (the paper sums them), so their scale does not grow with image size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, ScoreCollection, register
from aeflow.nn.blocks import (
    ConvDecoder,
    ConvEncoder,
    check_image_size,
    reconstruction_scores,
)

# The two components of the paper's score, min-max normalised with statistics of normal validation images.
NORMALISED = ("score_psnr", "score_distance")
# Smallest min-max range a component is divided by, relative to its magnitude (a component that does not vary over
# normal images would otherwise be blown up from rounding noise).
RELATIVE_RANGE_FLOOR = 1e-3


# --- memory read and update ----------------------------------------------------------------------------------


class Memory(nn.Module):
    """M unit-length memory items of dimension C; a buffer updated by the paper's rule, not a parameter."""

    def __init__(self, items: int, dim: int):
        super().__init__()
        self.register_buffer("items", F.normalize(torch.randn(items, dim), dim=1))

    def read(self, queries: torch.Tensor) -> torch.Tensor:
        """N x C unit queries -> N x 2C: each query concatenated with its attention read of the memory."""
        weights = (queries @ self.items.T).softmax(dim=1)
        return torch.cat([queries, weights @ self.items], dim=1)

    @torch.no_grad()
    def update(self, queries: torch.Tensor) -> None:
        """The paper's weighted update with the N x C queries of a training batch."""
        scores = queries @ self.items.T  # N x M
        nearest = F.one_hot(scores.argmax(dim=1), len(self.items)).to(scores.dtype)
        votes = scores.softmax(dim=0) * nearest  # v^k_m, kept only for the queries in U_m
        votes = votes / votes.amax(dim=0, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)  # v'
        # A new tensor, not an in-place write: this batch's loss still holds the old items for its backward pass.
        self.items = F.normalize(self.items + votes.T @ queries, dim=1)

    def nearest_two(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest and second-nearest items of each query (by p_m^T q^k, as the read weights rank them)."""
        index = (queries @ self.items.T).topk(2, dim=1).indices
        return self.items[index[:, 0]], self.items[index[:, 1]]


def compactness_loss(queries: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ||q^k - p_p||^2."""
    return (queries - nearest).pow(2).sum(1).mean()


def separateness_loss(queries: torch.Tensor, nearest: torch.Tensor, second: torch.Tensor,
                      margin: float = 1.0) -> torch.Tensor:
    """Mean over queries of [||q^k - p_p||^2 - ||q^k - p_n||^2 + margin]_+."""
    return F.relu((queries - nearest).pow(2).sum(1) - (queries - second).pow(2).sum(1) + margin).mean()


# --- the model ------------------------------------------------------------------------------------------------


@register("mnad")
class MNAD(AnomalyModel):
    """MNAD (reconstruction): conv encoder -> unit queries -> memory read -> conv decoder on [q, p_hat].

    memory_items: M; compactness_weight / separateness_weight: lambda_c / lambda_s; margin: alpha of the
    separateness loss; score_weight: lambda of the score (on the PSNR term). `pred_score` is the paper's
    combination (needs `calibrate`); every component is returned as score_<name>: psnr (-PSNR), distance (D), and
    the plain reconstruction scores mse, topk and ssim. The map is the squared residual smoothed with `blur_sigma`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        memory_items: int = 10,
        compactness_weight: float = 0.1,
        separateness_weight: float = 0.1,
        margin: float = 1.0,
        score_weight: float = 0.6,
        topk_fraction: float = 0.01,
        blur_sigma: float = 2.0,
    ):
        super().__init__()
        if not 0 < topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1]; got {topk_fraction}")
        if memory_items < 2:
            raise ConfigError(f"memory_items must be >= 2 (the separateness loss needs a second item); got {memory_items}")
        if not 0 <= score_weight <= 1:
            raise ConfigError(f"score_weight must be in [0, 1]; got {score_weight}")
        for name, value in (("compactness_weight", compactness_weight), ("separateness_weight", separateness_weight),
                            ("margin", margin), ("blur_sigma", blur_sigma)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0; got {value}")
        dim = widths[-1]
        self.encoder = ConvEncoder(in_channels, widths)
        self.memory = Memory(memory_items, dim)
        self.decoder = ConvDecoder(2 * dim, list(reversed(widths)), in_channels)
        self.size_multiple = 2 ** len(widths)
        # Minimum and maximum of each NORMALISED component over normal validation images (`calibrate`).
        self.register_buffer("score_min", torch.zeros(len(NORMALISED)))
        self.register_buffer("score_max", torch.ones(len(NORMALISED)))
        self.register_buffer("calibrated", torch.tensor(False))

    # 1. encoder: every position of the bottleneck is a query
    def queries(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x h x w map of unit-length queries."""
        check_image_size(images, self.size_multiple)
        return F.normalize(self.encoder(images), dim=1)

    # 2. memory read, then the decoder
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, queries as N x C with N = B h w)."""
        q = self.queries(images)
        b, c, h, w = q.shape
        flat = q.permute(0, 2, 3, 1).reshape(-1, c)
        read = self.memory.read(flat).view(b, h, w, 2 * c).permute(0, 3, 1, 2)
        return self.decoder(read), flat

    # 4. loss, and 3. the memory update after it
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        recon, queries = self(batch.image)
        nearest, second = self.memory.nearest_two(queries)
        reconstruction = F.mse_loss(recon, batch.image)
        compact = compactness_loss(queries, nearest)
        separate = separateness_loss(queries, nearest, second, self._config["margin"])
        total = (reconstruction + self._config["compactness_weight"] * compact
                 + self._config["separateness_weight"] * separate)
        if self.training:
            self.memory.update(queries.detach())
        return {"loss": total, "recon": reconstruction, "compact": compact, "separate": separate}

    # 5. score
    @torch.no_grad()
    def score_components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The map and every image score component (none normalised)."""
        recon, queries = self(images)
        out = reconstruction_scores(images, recon, blur_sigma=self._config["blur_sigma"],
                                    topk_fraction=self._config["topk_fraction"])
        mse = (images - recon).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        peak = recon.flatten(1).amax(1)
        out["score_psnr"] = -10 * torch.log10(peak.pow(2).clamp_min(1e-12) / mse)
        nearest, _ = self.memory.nearest_two(queries)
        out["score_distance"] = (queries - nearest).pow(2).sum(1).view(len(images), -1).mean(1)
        return out

    def blend(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """S = lambda g(-P) + (1 - lambda) g(D), g the min-max with the calibration statistics."""
        lam = self._config["score_weight"]
        g = [(parts[name] - self.score_min[i]) / (self.score_max[i] - self.score_min[i])
             for i, name in enumerate(NORMALISED)]
        return lam * g[0] + (1 - lam) * g[1]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not bool(self.calibrated):
            raise ConfigError("MNAD's score min-max normalises PSNR and memory distance with statistics of normal "
                              "images: call calibrate() with normal validation images first (training does this)")
        out = self.score_components(images)
        out["pred_score"] = self.blend(out)
        return out

    @staticmethod
    def calibration_set() -> ScoreCollection:
        return ScoreCollection()

    @torch.no_grad()
    def calibrate(self, images: Iterable[Batch | torch.Tensor]) -> None:
        """Fit g's minimum and maximum on the NORMAL images of `images` (Batches, whose label <= 0 marks the normal
        ones, or image tensors, all taken as normal); never pass test images."""
        collected = self.calibration_set()
        was_training = self.training
        self.eval()
        device = self.score_min.device
        for item in images:
            batch_images = item.image if isinstance(item, Batch) else item
            labels = item.label if isinstance(item, Batch) else torch.zeros(len(item), dtype=torch.long)
            if len(batch_images):
                collected.add(self.score_components(batch_images.to(device)), labels)
        self.train(was_training)
        self.fit_calibration(collected)

    @torch.no_grad()
    def fit_calibration(self, collected: ScoreCollection) -> None:
        normal = collected.label_tensor() <= 0
        if int(normal.sum()) < 2:
            raise ConfigError("calibrate() needs at least two normal images")
        for i, name in enumerate(NORMALISED):
            values = collected.component(name)[normal]
            low, high = values.min(), values.max()
            floor = RELATIVE_RANGE_FLOOR * float(values.abs().mean()) + 1e-12
            self.score_min[i] = low
            self.score_max[i] = torch.maximum(high, low + floor)
        self.calibrated.fill_(True)
