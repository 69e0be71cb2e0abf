"""CFA: Coupled-hypersphere-based Feature Adaptation for target-oriented anomaly localization (Lee, Lee and Song,
IEEE Access 10, 2022, arXiv:2206.04325).

A frozen ImageNet backbone gives patch features at strides 4, 8 and 16; each is averaged over its 3 x 3
neighbourhood, the coarser ones are up-sampled to stride 4 and all are concatenated (as in PaDiM / PatchCore).
A small trainable *patch descriptor* phi, a 1 x 1 convolution, adapts these features to the target data set.

Memory bank. Before training, phi (at its initial weights) describes every training image; the memory bank C holds
the mean descriptor of each patch position over the training images, thinned to a fraction `memory_ratio` of the
positions (the paper's gamma_c, by k-means there; here by the greedy coreset of PatchCore). C is then fixed.

Loss (paper, eq. 4-6). For each descriptor p_t = phi(x)_t, let c_1..c_K be its K nearest memory points and
c_{K+1}..c_{K+J} the next J ("hard negatives"), D the squared Euclidean distance:
    L_att = 1 / (T K) sum_t sum_k max(0, D(p_t, c_k) - r^2)
    L_rep = 1 / (T J) sum_t sum_j max(0, r^2 - D(p_t, c_j) - alpha)
    L_CFA = (L_att + L_rep) / nu.
L_att pulls every descriptor into the hypersphere of radius r around its K nearest memory points; L_rep pushes the
hard negatives out of it (to beyond r^2 - alpha), so that the spheres stay separate and the descriptor does not
collapse onto one memory point.

Score (paper, eq. 7). A test patch scores softmin over its K nearest memory points of D, taken at the nearest:
s_t = softmin(D(p_t, c_1..c_K))_1 * D(p_t, c_1): the nearest distance, discounted when other memory points are
about as near. The map is up-sampled to the image and smoothed (sigma 4, as in the paper); the image score is its
maximum.

Where this departs from the paper and the authors' code, and why:
- The descriptor is a plain 1 x 1 convolution; the authors' code uses a CoordConv (coordinates appended as extra
  input channels). Positions are not fed in, so one model serves any image size.
- The hard negatives are the (K+1)-th to (K+J)-th nearest memory points, as the paper writes; the authors' code
  slices its sorted distances at J instead of K (the same when K = J, the default).
- The memory is thinned by the greedy coreset rather than k-means; with the default memory_ratio = 1 (the
  paper's gamma_c = 1) neither runs.
- With the paper's r = 1e-5 and alpha = 0.1, r^2 - alpha < 0 and L_rep is zero for every descriptor: the paper's
  setting trains by attraction alone. The defaults keep it; r and alpha are options.
- Training is not driven by the shared epoch loop: the memory bank needs one pass over the training images
  before the first gradient step, so `fit` does both (the backbone is frozen and nothing is augmented, so its
  features are computed once and the `epochs` passes over them train only the descriptor). The paper trains 30
  epochs with Adam (lr 1e-3, weight decay 5e-4, AMSGrad); those are the defaults.

Status: on the 128 px synthetic phantoms with EfficientNet-Lite0, 3 epochs and a quarter of the positions as memory,
image AUROC 0.87 and pixel AUROC 0.97 (tests/models/test_feature_banks.py); there, as on the boards, the initial
memory already does most of it (0.85 before any training). The two boards: docs/results/rows_feature_banks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.patchcore import greedy_coreset
from aeflow.nn.blocks import FeatureStages, adopt_buffer_shapes, gaussian_blur


def squared_distances(descriptors: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """N x M squared Euclidean distances between descriptor rows (N x D) and memory rows (M x D)."""
    return (descriptors.pow(2).sum(1, keepdim=True) + memory.pow(2).sum(1) - 2 * descriptors @ memory.T).clamp_min(0)


def soft_boundary_loss(descriptors: torch.Tensor, memory: torch.Tensor, *, k: int, j: int, radius: float,
                       alpha: float, nu: float) -> dict[str, torch.Tensor]:
    """The paper's L_att and L_rep (eq. 4-5) for N x D descriptors against an M x D memory, and their sum / nu."""
    nearest = squared_distances(descriptors, memory).topk(k + j, dim=1, largest=False).values
    attraction = (nearest[:, :k] - radius**2).clamp_min(0).mean()
    repulsion = (radius**2 - nearest[:, k:] - alpha).clamp_min(0).mean() if j else nearest.new_zeros(())
    return {"loss": (attraction + repulsion) / nu, "attraction": attraction, "repulsion": repulsion}


@register("cfa")
class CFA(AnomalyModel):
    """CFA over a frozen `backbone` (see aeflow.nn.backbones).

    descriptor_ratio: the descriptor's output channels as a fraction of the backbone's (the paper's 1 / gamma_d).
    memory_ratio: fraction of the patch positions kept in the memory bank (1 / gamma_c).
    k, j, radius, alpha, nu: the loss's K nearest, J hard negatives, r, margin alpha and nu (paper: 3, 3, 1e-5,
    0.1, 1e-3). epochs, lr, weight_decay: the descriptor's training (paper: 30, 1e-3, 5e-4, Adam with AMSGrad).
    """

    trained_by_gradient = False  # fit() builds the memory, then trains the descriptor itself (see the module doc)

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        descriptor_ratio: float = 1.0,
        memory_ratio: float = 1.0,
        k: int = 3,
        j: int = 3,
        radius: float = 1e-5,
        alpha: float = 0.1,
        nu: float = 1e-3,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        batch_size: int = 32,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < descriptor_ratio <= 1:
            raise ConfigError(f"descriptor_ratio must be in (0, 1]; got {descriptor_ratio}")
        if not 0 < memory_ratio <= 1:
            raise ConfigError(f"memory_ratio must be in (0, 1]; got {memory_ratio}")
        if k < 1 or j < 0:
            raise ConfigError(f"k must be >= 1 and j >= 0; got k={k}, j={j}")
        if radius < 0 or nu <= 0:
            raise ConfigError(f"radius must be >= 0 and nu > 0; got radius={radius}, nu={nu}")
        if epochs < 0 or batch_size < 1:
            raise ConfigError(f"epochs must be >= 0 and batch_size >= 1; got {epochs}, {batch_size}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        channels = sum(self.features.out_channels)
        self.descriptor = nn.Conv2d(channels, max(1, round(descriptor_ratio * channels)), 1)
        self.register_buffer("memory", torch.empty(0))  # M x D, filled by fit()

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x H/4 x W/4: the three stages, each 3x3-averaged, up-sampled to stride 4 and concatenated."""
        stages = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.features(images)]
        size = stages[0].shape[-2:]
        return torch.cat([stages[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                        for f in stages[1:]], dim=1)

    def describe(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w patch features -> (B h w) x D descriptors."""
        return self.descriptor(features).permute(0, 2, 3, 1).flatten(0, 2)

    def loss_on(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self._config
        k = min(c["k"], len(self.memory))
        j = min(c["j"], len(self.memory) - k)
        return soft_boundary_loss(self.describe(features), self.memory, k=k, j=j, radius=c["radius"],
                                  alpha=c["alpha"], nu=c["nu"])

    def fit(self, loader) -> None:
        """Build the memory bank from the initial descriptor, then train the descriptor with L_CFA."""
        c = self._config
        device = self.descriptor.weight.device
        self.features.eval()
        with torch.no_grad():
            features = [self.patch_features(batch.image.to(device)) for batch in loader]
        if not features:
            raise DataError("CFA needs training images; the loader was empty")
        features = torch.cat(features)
        generator = torch.Generator().manual_seed(c["seed"])
        with torch.no_grad():
            mean = self.descriptor(features).mean(0)  # D x h x w: the mean normal descriptor at each position
            memory = mean.flatten(1).T
            size = max(1, round(c["memory_ratio"] * len(memory)))
            if size < len(memory):
                memory = memory[greedy_coreset(memory, size, None, generator)]
        self.memory = memory.contiguous()
        optimizer = torch.optim.Adam(self.descriptor.parameters(), lr=c["lr"], weight_decay=c["weight_decay"],
                                     amsgrad=True)
        self.descriptor.train()
        with torch.enable_grad():
            for _ in range(c["epochs"]):
                for batch in torch.randperm(len(features), generator=generator).split(c["batch_size"]):
                    loss = self.loss_on(features[batch])["loss"]
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.eval()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("memory",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.memory.numel() == 0:
            raise AeflowError("CFA has not been fitted: call fit(loader) on normal images first")
        features = self.patch_features(images)
        b, _, h, w = features.shape
        k = min(self._config["k"], len(self.memory))
        nearest = squared_distances(self.describe(features), self.memory).topk(k, dim=1, largest=False).values
        patch_scores = F.softmin(nearest, dim=1)[:, 0] * nearest[:, 0]
        anomaly_map = F.interpolate(patch_scores.view(b, 1, h, w), size=images.shape[-2:], mode="bilinear",
                                    align_corners=False).squeeze(1)
        anomaly_map = gaussian_blur(anomaly_map, self._config["blur_sigma"])
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}
