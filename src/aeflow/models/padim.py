"""PaDiM: a Patch Distribution Modeling framework for anomaly detection and localization (Defard et al., ICPR
workshops 2020, arXiv:2011.08785).

Nothing is trained. A frozen ImageNet backbone embeds every patch of every normal training image by concatenating
its stride-4, -8 and -16 features (the coarser ones up-sampled); a random subset of d channels keeps the cost
down. At each patch position (i, j) the training embeddings are modelled by one multivariate Gaussian
N(mu_ij, Sigma_ij). A test patch's anomaly score is its Mahalanobis distance to the Gaussian of its position; the
up-sampled, smoothed distance map is the anomaly map and its maximum the image score.

Memory and scale, honestly: the model is P x d x d precision matrices (P = (H/4) x (W/4) positions), e.g. 3.8 GB
in float32 for Wide-ResNet-50-2 at 224 px with d = 550, and fitting accumulates P x d x d sums in float64 (twice
that). The statistics are sums, so the fit shards: under DDP (aeflow.training.distributed) each rank sums over
its share of the training images, and the count and both sums are all-reduced (torch.distributed, when a
process group exists) before the Gaussians are formed: the one-process fit up to float64 summation order. What does not shard: every rank holds the full
P x d x d sums while fitting, and every device must hold the whole model to score. Positions are fixed by the
training image size, so test images must have that size (and be roughly aligned, as the paper assumes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages, PositionGaussians, adopt_buffer_shapes, gaussian_blur, mahalanobis_squared


# The paper's random channel subset size d per backbone.
PAPER_N_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100}


@register("padim")
class PaDiM(AnomalyModel):
    """PaDiM with a frozen `backbone` (see aeflow.nn.backbones) and `n_features` random channels (None: the
    paper's d for the backbone, all channels for backbones the paper did not use).

    The paper's settings: Wide-ResNet-50-2 with d = 550 (ResNet-18: d = 100), epsilon = 0.01, Gaussian smoothing
    with sigma = 4 pixels. `seed` fixes the channel subset, which is stored with the model.
    """

    trained_by_gradient = False

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        n_features: int | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0 (it makes the covariances invertible); got {epsilon}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        total = sum(self.features.out_channels)
        d = PAPER_N_FEATURES.get(backbone, total) if n_features is None else n_features
        if not 1 <= d <= total:
            raise ConfigError(f"n_features must be in [1, {total}] for backbone {backbone!r} (or None); got {d}")
        generator = torch.Generator().manual_seed(seed)
        channels = torch.randperm(total, generator=generator)[:d].sort().values
        self.register_buffer("channel_index", channels)
        self.register_buffer("mean", torch.empty(0))  # P x d, filled by fit()
        self.register_buffer("precision", torch.empty(0))  # P x d x d

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x d x h x w patch embeddings at stride 4: all stages concatenated, then the channel subset."""
        stages = self.features(images)
        size = stages[0].shape[-2:]
        stages = [stages[0]] + [F.interpolate(f, size=size, mode="nearest") for f in stages[1:]]
        return torch.cat(stages, dim=1)[:, self.channel_index]

    @torch.no_grad()
    def fit(self, loader) -> None:
        """One pass over batches of normal images: accumulate per-position sums (over all ranks under DDP), then
        the Gaussians."""
        sums = PositionGaussians()
        for batch in loader:
            sums.add(self.embed(batch.image.to(self.channel_index.device)))
        sums.all_reduce()
        if sums.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images to estimate covariances; got {sums.count}")
        mean, precision = sums.gaussians(self._config["epsilon"])
        self.mean, self.precision = mean, precision

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("mean", "precision"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mean.numel() == 0:
            raise AeflowError("PaDiM has not been fitted: call fit(loader) on normal images first")
        x = self.embed(images)
        b, d, h, w = x.shape
        if h * w != self.mean.shape[0]:
            raise DataError(f"PaDiM was fitted at {self.mean.shape[0]} patch positions but these images give {h}x{w}; "
                            "score images of the training size")
        distances = mahalanobis_squared(x, self.mean, self.precision).sqrt().unsqueeze(1)
        anomaly_map = F.interpolate(distances, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = gaussian_blur(anomaly_map.squeeze(1), self._config["blur_sigma"])
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}

