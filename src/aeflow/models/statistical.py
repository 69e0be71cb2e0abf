"""Statistical detector: a per-pixel Gaussian of normal intensities and the distance of an image's intensity
histogram to those of normal images. The oldest of the "traditional methods" in anomaly-detection surveys, kept
as an honest floor that any learned model must clear.

Nothing is trained. Two statistics of the normal training images (intensities in [0, 1] as the data layer gives
them; every channel modelled on its own):

1. Per-pixel Gaussian. At each position (i, j) and channel c the normal images give a mean mu_cij and a standard
   deviation sigma_cij. A test pixel's z-score is z_cij = (x_cij - mu_cij) / sqrt(sigma_cij^2 + epsilon), the
   voxel-wise z-score map against a group of normal controls that medical imaging uses for atlas-aligned scans
   (e.g. voxel-based morphometry, Ashburner & Friston, NeuroImage 2000). The anomaly map is the root-mean-square
   z over channels, Gaussian-smoothed (a lesion is a region, one noisy pixel is not); `score_pixel` is its
   maximum. epsilon (a variance floor, 1e-4 = a standard deviation of 0.01, about 2.5 grey levels of 8 bits) keeps
   positions that are constant in every normal image (a black border) from turning rounding noise into huge z.
   Like PaDiM, it assumes the images are roughly aligned; positions are fixed by the training size.
2. Histogram distance. Every image's grey-level histogram (channels averaged, `bins` bins over [0, 1]); the
   score is the mean Wasserstein-1 distance to its `histogram_neighbours` nearest normal histograms (1-D W1 is
   the L1 distance between the cumulative histograms times the bin width: it counts how far intensity mass has
   to move, so a global brightening or a change of contrast registers in proportion to its size, where bin-wise
   chi-square saturates once the histograms stop overlapping). This catches global changes (a hazy, low-contrast
   X-ray) that shift no single pixel far from its mean. The nearest neighbours, not the mean histogram, because
   normal images of one data set need not share one histogram (several scanners, exposures).

Image score (`score`): "sum" (default) adds the two components, each standardised by its mean and standard
deviation over the normal training images (a second pass over them after fitting; the histogram component
leaves each image's own histogram out, the pixel component is in-sample, which makes the training normals'
pixel scores slightly low, the same shift for every test image). "pixel" or "histogram" use one component alone;
both are returned as `score_pixel` and `score_histogram` either way.
"""

from __future__ import annotations

import torch

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import Moments, adopt_buffer_shapes, gaussian_blur

SCORES = ("sum", "pixel", "histogram")
COMPONENTS = ("pixel", "histogram")


def intensity_histograms(images: torch.Tensor, bins: int) -> torch.Tensor:
    """B x bins grey-level histograms (channels averaged, values clamped to [0, 1]) that sum to one."""
    gray = images.mean(1).flatten(1).clamp(0, 1)
    index = (gray * bins).long().clamp_max(bins - 1)
    counts = torch.zeros(len(images), bins, device=images.device).scatter_add_(1, index, torch.ones_like(gray))
    return counts / gray.shape[1]


def wasserstein_1d(histograms: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """B x N Wasserstein-1 distances between histograms on the same bins over [0, 1]."""
    return torch.cdist(histograms.cumsum(1), bank.cumsum(1), p=1) / histograms.shape[1]


@register("statistical")
class Statistical(AnomalyModel):
    """Per-pixel Gaussian z-score map plus a histogram distance (see the module docstring).

    bins: histogram bins over [0, 1]. histogram_neighbours: normal histograms averaged over for the histogram score.
    epsilon: variance floor of the per-pixel Gaussians. blur_sigma: smoothing of the z map in pixels.
    score: "sum", "pixel" or "histogram".
    """

    trained_by_gradient = False

    def __init__(self, bins: int = 32, histogram_neighbours: int = 5, epsilon: float = 1e-4,
                 blur_sigma: float = 2.0, score: str = "sum"):
        super().__init__()
        if bins < 2:
            raise ConfigError(f"bins must be >= 2; got {bins}")
        if histogram_neighbours < 1:
            raise ConfigError(f"histogram_neighbours must be >= 1; got {histogram_neighbours}")
        if epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0 (a variance floor); got {epsilon}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        if score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
        self.register_buffer("pixel_mean", torch.empty(0))  # C x H x W, filled by fit()
        self.register_buffer("pixel_std", torch.empty(0))  # C x H x W, epsilon included
        self.register_buffer("histograms", torch.empty(0))  # N x bins, one per normal training image
        self.register_buffer("component_mean", torch.zeros(len(COMPONENTS)))
        self.register_buffer("component_std", torch.ones(len(COMPONENTS)))

    @torch.no_grad()
    def fit(self, loader) -> None:
        """Pass 1: per-pixel moments and the histograms. Pass 2: the components' spread over the same images."""
        device = self.component_mean.device
        moments, histograms = Moments(), []
        for batch in loader:
            images = batch.image.to(device)
            moments.add(images)
            histograms.append(intensity_histograms(images, self._config["bins"]))
        if moments.count < 2:
            raise DataError(f"the statistical model needs at least 2 training images; got {moments.count}")
        mean, std = moments.mean_std()
        self.pixel_mean, self.pixel_std = mean, (std.pow(2) + self._config["epsilon"]).sqrt()
        self.histograms = torch.cat(histograms)
        spread = Moments()
        for batch in loader:
            components = self.components(batch.image.to(device), leave_one_out=True)
            spread.add(torch.stack([components[name] for name in COMPONENTS], 1))
        mean, std = spread.mean_std()
        self.component_mean, self.component_std = mean, std.clamp_min(1e-12)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("pixel_mean", "pixel_std", "histograms"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def components(self, images: torch.Tensor, *, leave_one_out: bool = False) -> dict[str, torch.Tensor]:
        """The z map (B x H x W) and both score components. leave_one_out: the images are training images, whose
        own histogram (distance 0) must not count among their neighbours."""
        if self.pixel_mean.shape[-2:] != images.shape[-2:] or self.pixel_mean.shape[0] != images.shape[1]:
            raise DataError(f"the statistical model was fitted on {tuple(self.pixel_mean.shape)} images but these "
                            f"are {tuple(images.shape[1:])}; score images of the training size and channels")
        z = (images - self.pixel_mean) / self.pixel_std
        anomaly_map = gaussian_blur(z.pow(2).mean(1).sqrt(), self._config["blur_sigma"])
        distances = wasserstein_1d(intensity_histograms(images, self._config["bins"]), self.histograms)
        skip = int(leave_one_out)
        k = min(self._config["histogram_neighbours"], distances.shape[1] - skip)
        nearest = distances.topk(k + skip, dim=1, largest=False).values[:, skip:]
        return {"anomaly_map": anomaly_map, "pixel": anomaly_map.flatten(1).amax(1), "histogram": nearest.mean(1)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.pixel_mean.numel() == 0:
            raise AeflowError("the statistical model has not been fitted: call fit(loader) on normal images first")
        out = self.components(images)
        standardized = [(out[name] - self.component_mean[i]) / self.component_std[i] for i, name in enumerate(COMPONENTS)]
        score = self._config["score"]
        pred_score = standardized[0] + standardized[1] if score == "sum" else out[score]
        return {"pred_score": pred_score, "anomaly_map": out["anomaly_map"],
                "score_pixel": out["pixel"], "score_histogram": out["histogram"]}
