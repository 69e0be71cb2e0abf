"""Texture-statistics detector: local binary pattern histograms per position and grey-level co-occurrence
statistics per image, each compared with those of normal images. The classical texture route to defect
detection (LBP: Ojala, Pietikainen & Maenpaa, IEEE TPAMI 2002, used for surface inspection by comparing local
LBP histograms with normal references, Maenpaa et al., Pattern Recognition 2003; GLCM: Haralick, Shanmugam &
Dinstein, IEEE TSMC 1973), among the "traditional methods" of anomaly-detection surveys.

Nothing is trained. Every image is taken to grey (channels averaged) and described twice, with scikit-image:

1. LBP map. Rotation-invariant uniform local binary patterns (`lbp_points` neighbours on a circle of
   `lbp_radius` pixels: P + 2 codes; `lbp_method="nri_uniform"` keeps the orientation, P (P - 1) + 3 codes) at
   every pixel, and their histogram in a `window` x `window` box around it. Radius 2 (with P = 8, one of Ojala
   et al.'s standard pairs) by default, not 1: the 8 adjacent pixels of radius 1 mostly compare pixel noise in
   medical images, where grain of a few pixels is what a texture change looks like.
   At each position the normal images give a reference histogram (their mean); a pixel's distance is the
   chi-square distance of its local histogram to the reference of its position, sum (h - r)^2 / (h + r), the
   dissimilarity Ojala et al. use for LBP histograms. Positions differ in how much their texture varies (an edge
   against a flat region), so each distance is turned into a z-score with the mean and standard deviation of the
   normal images' distances at that position (a second pass). The smoothed z map is the anomaly map and its
   maximum the `score_lbp` component.
2. GLCM statistics. The grey-level co-occurrence matrix of the whole image (quantised to `glcm_levels` levels) at
   `glcm_distances` pixels and four directions, and five of Haralick's statistics of it (contrast,
   dissimilarity, homogeneity, energy, correlation), averaged over the directions (rotation invariance): a
   5 x len(glcm_distances) vector per image, with no map. The normal vectors give a Gaussian (full covariance
   on standardised features plus `epsilon` I, inverted through Cholesky); `score_glcm` is the Mahalanobis
   distance. Pooled over the whole image, it sees global texture changes (a haze, a different grain) that local
   windows may each find within normal range.

Image score (`score`): "sum" (default) adds the two components, each standardised by its mean and standard
deviation over the normal training images (a third pass, in-sample: the training normals' scores are slightly
lower than those of new normal images, the same shift for every test image); "lbp" or "glcm" use one alone.
The LBP part fixes positions by the training size, so test images must have it (and be roughly aligned).
Departure: the LBP reference is the mean histogram per position rather than a bank of reference histograms
searched for the nearest, which keeps the model at one histogram per pixel.

What it cannot see: LBP codes do not change when intensities are shifted or scaled (their design), so a lesion
that is a brighter or darker blob of the same grain shows only at its rim; on the built-in lesion phantoms the
LBP component's image AUROC is 0.545 (20 vs 20), while a change of grain inside the brain is found (0.835,
tests/models/test_classical.py). Use the statistical or filter-bank detector for intensity defects.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import Moments, adopt_buffer_shapes, gaussian_blur

SCORES = ("sum", "lbp", "glcm")
COMPONENTS = ("lbp", "glcm")
# Number of codes of each scikit-image LBP method for P points: rotation-invariant uniform patterns (P + 1 uniform
# ones and one bin for the rest) and the non-rotation-invariant uniform ones (P (P - 1) + 2 plus the rest).
LBP_CODES = {"uniform": lambda p: p + 2, "nri_uniform": lambda p: p * (p - 1) + 3}
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x H x W grey images in 0..255 (channels averaged; intensities clamped to [0, 1])."""
    return (images.mean(1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@register("texture")
class Texture(AnomalyModel):
    """Local LBP histograms per position (map) plus image-level GLCM statistics (see the module docstring).

    lbp_points, lbp_radius: the LBP circle. window: side of the local histogram box (odd). glcm_levels: grey
    levels of the co-occurrence matrix. glcm_distances: pixel offsets. epsilon: ridge of the GLCM covariance
    (on features standardised to unit variance). blur_sigma: smoothing of the z map. score: "sum", "lbp" or "glcm".
    """

    trained_by_gradient = False

    def __init__(self, lbp_points: int = 8, lbp_radius: float = 2.0, lbp_method: str = "uniform", window: int = 9,
                 glcm_levels: int = 16,
                 glcm_distances: tuple[int, ...] = (1, 2), epsilon: float = 0.01, blur_sigma: float = 2.0,
                 score: str = "sum"):
        super().__init__()
        if lbp_points < 4 or lbp_radius <= 0:
            raise ConfigError(f"lbp_points must be >= 4 and lbp_radius > 0; got {lbp_points}, {lbp_radius}")
        if lbp_method not in LBP_CODES:
            raise ConfigError(f"lbp_method must be one of {', '.join(LBP_CODES)}; got {lbp_method!r}")
        if window < 3 or window % 2 == 0:
            raise ConfigError(f"window must be an odd number >= 3; got {window}")
        if not 2 <= glcm_levels <= 256:
            raise ConfigError(f"glcm_levels must be in [2, 256]; got {glcm_levels}")
        if not glcm_distances or min(glcm_distances) < 1:
            raise ConfigError(f"glcm_distances must be positive pixel offsets; got {glcm_distances}")
        if epsilon <= 0 or blur_sigma < 0:
            raise ConfigError(f"epsilon must be > 0 and blur_sigma >= 0; got {epsilon}, {blur_sigma}")
        if score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
        self.register_buffer("reference", torch.empty(0))  # (P + 2) x H x W mean local LBP histograms, from fit()
        self.register_buffer("distance_mean", torch.empty(0))  # H x W, normal chi-square distances
        self.register_buffer("distance_std", torch.empty(0))
        n_glcm = len(GLCM_PROPERTIES) * len(glcm_distances)
        self.register_buffer("glcm_mean", torch.zeros(n_glcm))
        self.register_buffer("glcm_scale", torch.ones(n_glcm))
        self.register_buffer("glcm_precision", torch.eye(n_glcm))
        self.register_buffer("component_mean", torch.zeros(len(COMPONENTS)))
        self.register_buffer("component_std", torch.ones(len(COMPONENTS)))

    def local_histograms(self, images: torch.Tensor) -> torch.Tensor:
        """B x (P + 2) x H x W: the histogram of uniform LBP codes in the window around every pixel."""
        points, radius, method = self._config["lbp_points"], self._config["lbp_radius"], self._config["lbp_method"]
        codes = np.stack([local_binary_pattern(g, points, radius, method=method) for g in to_uint8(images)])
        one_hot = F.one_hot(torch.from_numpy(codes).long(), LBP_CODES[method](points)).permute(0, 3, 1, 2).float()
        window = self._config["window"]
        return F.avg_pool2d(one_hot, window, stride=1, padding=window // 2, count_include_pad=False).to(images.device)

    def glcm_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x (5 x len(glcm_distances)) Haralick statistics, averaged over the four directions."""
        levels, distances = self._config["glcm_levels"], self._config["glcm_distances"]
        quantised = (to_uint8(images).astype(np.int64) * levels // 256).astype(np.uint8)
        rows = []
        for g in quantised:
            matrix = graycomatrix(g, distances, GLCM_ANGLES, levels=levels, symmetric=True, normed=True)
            # Correlation is undefined (NaN) on a constant image; it is then taken as 1 (a perfect linear relation).
            rows.append(np.concatenate([np.nan_to_num(graycoprops(matrix, p), nan=1.0).mean(1) for p in GLCM_PROPERTIES]))
        return torch.tensor(np.stack(rows), dtype=torch.float32, device=images.device)

    def chi_square(self, histograms: torch.Tensor) -> torch.Tensor:
        """B x H x W chi-square distances of local histograms to the reference of their position."""
        return ((histograms - self.reference).pow(2) / (histograms + self.reference).clamp_min(1e-12)).sum(1)

    @torch.no_grad()
    def fit(self, loader) -> None:
        """Pass 1: reference LBP histograms and the GLCM Gaussian. Pass 2: the normal chi-square distances per
        position. Pass 3: the components' spread over the same images."""
        device = self.component_mean.device
        histograms, glcm = Moments(), []
        for batch in loader:
            images = batch.image.to(device)
            histograms.add(self.local_histograms(images))
            glcm.append(self.glcm_features(images).double())
        if histograms.count < 2:
            raise DataError(f"the texture model needs at least 2 training images; got {histograms.count}")
        self.reference = histograms.mean_std()[0]
        features = torch.cat(glcm)
        mean, scale = features.mean(0), features.std(0).clamp_min(1e-12)
        standardised = (features - mean) / scale
        covariance = standardised.T @ standardised / (len(features) - 1)
        covariance = covariance + self._config["epsilon"] * torch.eye(len(mean), dtype=covariance.dtype)
        # Cholesky, not LU: see aeflow.nn.blocks.gaussian_precisions.
        precision = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
        self.glcm_mean, self.glcm_scale, self.glcm_precision = mean.float(), scale.float(), precision.float()
        distances = Moments()
        for batch in loader:
            distances.add(self.chi_square(self.local_histograms(batch.image.to(device))))
        mean, std = distances.mean_std()
        self.distance_mean, self.distance_std = mean, std.clamp_min(1e-6)
        spread = Moments()
        for batch in loader:
            components = self.components(batch.image.to(device))
            spread.add(torch.stack([components[name] for name in COMPONENTS], 1))
        mean, std = spread.mean_std()
        self.component_mean, self.component_std = mean, std.clamp_min(1e-12)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("reference", "distance_mean", "distance_std"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.reference.shape[-2:] != images.shape[-2:]:
            raise DataError(f"the texture model was fitted on {tuple(self.reference.shape[-2:])} images but these "
                            f"are {tuple(images.shape[-2:])}; score images of the training size")
        z = (self.chi_square(self.local_histograms(images)) - self.distance_mean) / self.distance_std
        anomaly_map = gaussian_blur(z, self._config["blur_sigma"])
        centred = (self.glcm_features(images) - self.glcm_mean) / self.glcm_scale
        mahalanobis = ((centred @ self.glcm_precision) * centred).sum(1).clamp_min(0).sqrt()
        return {"anomaly_map": anomaly_map, "lbp": anomaly_map.flatten(1).amax(1), "glcm": mahalanobis}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.reference.numel() == 0:
            raise AeflowError("the texture model has not been fitted: call fit(loader) on normal images first")
        out = self.components(images)
        standardized = [(out[name] - self.component_mean[i]) / self.component_std[i] for i, name in enumerate(COMPONENTS)]
        score = self._config["score"]
        pred_score = standardized[0] + standardized[1] if score == "sum" else out[score]
        return {"pred_score": pred_score, "anomaly_map": out["anomaly_map"],
                "score_lbp": out["lbp"], "score_glcm": out["glcm"]}
