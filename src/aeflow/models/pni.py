"""PNI: industrial anomaly detection using Position and Neighborhood Information (Bae, Lee and Kim, ICCV 2023,
arXiv:2211.12634).

PatchCore (aeflow.models.patchcore) asks whether a test patch feature phi is near *some* normal feature. PNI asks
whether it is near a normal feature that is likely *here*: at this position and with these neighbours.

Normal features. A frozen backbone gives PatchCore's locally aware patch features (stride-8 and stride-16 stages,
3x3-averaged, concatenated). The greedy coreset of all training patches gives the embedding coreset C_emb (a fraction
`coreset_ratio` of them) and, from the same greedy order, a distribution coreset C_dist of `distribution_size`
points: the classes over which the two conditional distributions below are learned.

p(c | neighbourhood). An MLP takes the features of the patches around a patch (its (2n+1) x (2n+1) window, the patch
itself left out, zero outside the image) and predicts which C_dist point is nearest to the patch's own feature,
trained with cross-entropy on the training patches. At test time softmax(logits / temperature) is p(c | N_p).

p(c | position). For every patch position, a histogram of the C_emb points nearest to the training patches at that
position and at positions up to n away, normalised: p(c | x).

Score. With p(phi | c) = gamma exp(-gamma ||phi - c||) and p(phi | Omega) ~ max_c p(phi | c) p(c | Omega), the paper
keeps the candidates that the conditional makes plausible, C_Omega = {c in C_emb : p(c | Omega) > tau / |C_emb|},
and scores -log max_{c in C_Omega} p(phi | c) = gamma min_{c in C_Omega} ||phi - c|| - log gamma: the distance to the
nearest *plausible* normal feature. gamma = 1 here (it only shifts and scales the score). A C_emb point is
plausible given the neighbourhood when its nearest C_dist point is; the neighbourhood and position scores are
averaged, as in the authors' code. Each (and PatchCore's plain nearest distance) is also returned as a score
component. The map is up-sampled and smoothed (sigma 4); the image score is its maximum.

Where this departs from the paper and the authors' code, and why:
- The pixel refinement network (the paper's last stage, `refinement=True`, off by default) is a small U-Net
  (aeflow.nn.blocks.UNet, widths `refinement_widths`) on [image, PNI map / s], s the 99th percentile of the maps of
  the normal training images, trained for `refinement_steps` steps of `batch_size` training images with DRAEM's
  simulated defects (aeflow.models.draem.simulate_anomalies: Perlin masks, Perlin or flipped-neighbour sources)
  against their masks with DRAEM's focal loss; the paper also trains on synthetic defects but with its own
  generator, network and losses. The refined map, p(defect) per pixel, replaces the anomaly map; the image score
  stays the maximum of the unrefined map (the paper's refinement is for the pixel level), and the unrefined map's
  maximum is `score_unrefined` beside it. Off by default: the boards' rows are "PNI without refinement". Measured
  on the tests' 128-px phantoms (EfficientNet-Lite0, seed 0; both printed by `pytest -s -k pni
  tests/models/test_feature_banks.py`): pixel AUROC 0.951 unrefined, 0.860 refined after 60 steps: defects simulated
  from Perlin noise teach it less about these lesions than PNI's own map knows. Each step scores its batch through
  PNI, so the refiner costs several minutes of fitting on a 2-core CPU.
- The MLP is small (hidden width and depth are options) and trained for a few epochs, so that it fits in seconds on
  a CPU; edge patches keep zero-padded neighbourhoods instead of being cut off.
- If no C_emb point is plausible (only possible with tau > 1) the patch falls back to the nearest point overall.
- Training is not driven by the shared epoch loop: the MLP's targets need the coreset, which needs a pass over
  all training images first, so `fit` does both (the backbone is frozen, its features are computed once).
- Positions are fixed by the training image size: test images must have that size (as for PaDiM).
Status: on the 128 px synthetic phantoms with EfficientNet-Lite0, image AUROC 0.89 and pixel AUROC 0.95
(tests/models/test_feature_banks.py), the same as its plain nearest-distance component: there the plausibility
sets did not change the image ranking. The two boards: docs/results/rows_feature_banks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.draem import focal_loss, simulate_anomalies
from aeflow.models.patchcore import CDIST_CHUNK_ELEMENTS, greedy_coreset, nearest_neighbours
from aeflow.nn.blocks import FeatureStages, UNet, adopt_buffer_shapes, gaussian_blur


def neighbourhood_features(features: torch.Tensor, radius: int) -> torch.Tensor:
    """B x D x h x w -> (B h w) x (D ((2r+1)^2 - 1)): each patch's window of features, the patch itself left out."""
    b, d, h, w = features.shape
    window = 2 * radius + 1
    unfolded = F.unfold(features, window, padding=radius).view(b, d, window * window, h * w)
    centre = window * window // 2
    keep = [i for i in range(window * window) if i != centre]
    return unfolded[:, :, keep].permute(0, 3, 1, 2).flatten(0, 1).flatten(1)


@register("pni")
class PNI(AnomalyModel):
    """PNI over a frozen `backbone` (see aeflow.nn.backbones).

    coreset_ratio: fraction of training patches in C_emb (the authors' code: 0.01). distribution_size: |C_dist|
    (their 2048; at most the number of training patches). neighbourhood: n, the window radius of the MLP's input and
    of the position histogram's spread. temperature, neighbourhood_tau, position_tau: the softmax temperature and the
    two plausibility thresholds tau. hidden, layers, epochs, lr, batch_size: the MLP and its training.
    refinement, refinement_steps, refinement_widths: the pixel refinement network (module docstring).
    """

    trained_by_gradient = False  # fit() builds the coreset, then trains the MLP itself (see the module doc)

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        coreset_ratio: float = 0.01,
        distribution_size: int = 2048,
        projection_dim: int | None = 128,
        neighbourhood: int = 1,
        hidden: int = 512,
        layers: int = 2,
        epochs: int = 5,
        lr: float = 1e-3,
        batch_size: int = 16,
        temperature: float = 1.0,
        neighbourhood_tau: float = 1.0,
        position_tau: float = 1.0,
        refinement: bool = False,
        refinement_steps: int = 300,
        refinement_widths: tuple[int, ...] | list[int] = (16, 32, 64),
        blur_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if refinement_steps < 1 or not refinement_widths or min(refinement_widths) < 1:
            raise ConfigError(f"refinement_steps must be >= 1 and refinement_widths positive widths; got "
                              f"{refinement_steps}, {list(refinement_widths)}")
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1]; got {coreset_ratio}")
        if distribution_size < 1 or neighbourhood < 1 or hidden < 1 or layers < 1:
            raise ConfigError("distribution_size, neighbourhood, hidden and layers must be >= 1; got "
                              f"{distribution_size}, {neighbourhood}, {hidden}, {layers}")
        if epochs < 0 or batch_size < 1 or temperature <= 0 or neighbourhood_tau < 0 or position_tau < 0:
            raise ConfigError("epochs >= 0, batch_size >= 1, temperature > 0 and the taus >= 0 are needed")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.feature_dim = sum(self.features.out_channels[1:])
        self.register_buffer("embedding_coreset", torch.empty(0))  # M x D
        self.register_buffer("distribution_coreset", torch.empty(0))  # M' x D
        self.register_buffer("embedding_to_distribution", torch.empty(0, dtype=torch.long))  # M: nearest C_dist point
        self.register_buffer("position_histogram", torch.empty(0))  # P x M: p(c | position)
        self.mlp = self.build_mlp(distribution_size)
        # The refiner sees the image as grey levels (the mean of its channels) and the map: 2 input channels.
        self.refiner = UNet(2, 2, tuple(refinement_widths)) if refinement else None
        self.register_buffer("map_scale", torch.ones(()))  # s: the unrefined maps are divided by it for the refiner

    def build_mlp(self, classes: int) -> nn.Sequential:
        window = (2 * self._config["neighbourhood"] + 1) ** 2 - 1
        sizes = [self.feature_dim * window] + [self._config["hidden"]] * self._config["layers"]
        blocks = [m for i in range(len(sizes) - 1) for m in (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())]
        return nn.Sequential(*blocks, nn.Linear(sizes[-1], classes))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D x H/8 x W/8: PatchCore's locally aware patch features."""
        _, mid, deep = self.features(images)
        mid, deep = (F.avg_pool2d(f, 3, stride=1, padding=1) for f in (mid, deep))
        deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([mid, deep], dim=1)

    def fit(self, loader) -> None:
        c = self._config
        device = self.position_histogram.device
        self.features.eval()
        images, maps = [], []
        with torch.no_grad():
            for batch in loader:
                maps.append(self.embed(batch.image.to(device)))
                if self.refiner is not None:
                    images.append(batch.image.to(device))
        if not maps:
            raise DataError("PNI needs training images; the loader was empty")
        maps = torch.cat(maps)  # N x D x h x w
        n, d, h, w = maps.shape
        patches = maps.permute(0, 2, 3, 1).reshape(-1, d)
        generator = torch.Generator().manual_seed(c["seed"])
        embedding_size = max(1, round(c["coreset_ratio"] * len(patches)))
        distribution_size = c["distribution_size"]
        if distribution_size > len(patches):
            raise DataError(f"PNI's distribution_size ({distribution_size}) exceeds the {len(patches)} training "
                            "patches; give a smaller distribution_size or more training images")
        order = greedy_coreset(patches, max(embedding_size, distribution_size), c["projection_dim"], generator)
        self.embedding_coreset = patches[order[:embedding_size]].contiguous()
        self.distribution_coreset = patches[order[:distribution_size]].contiguous()
        self.embedding_to_distribution = nearest_neighbours(self.embedding_coreset, self.distribution_coreset)[1][:, 0]

        # p(c | position): nearest C_emb point of every training patch, counted at its position and its window.
        nearest = nearest_neighbours(patches, self.embedding_coreset)[1][:, 0].view(n, h * w)
        counts = F.one_hot(nearest, embedding_size).float().sum(0)  # P x M
        window = 2 * c["neighbourhood"] + 1
        spread = F.avg_pool2d(counts.T.reshape(1, embedding_size, h, w), window, stride=1,
                              padding=c["neighbourhood"], count_include_pad=False)
        histogram = spread.reshape(embedding_size, h * w).T
        self.position_histogram = histogram / histogram.sum(1, keepdim=True)

        # p(c | neighbourhood): the MLP learns the nearest C_dist point of a patch from its neighbours.
        targets = nearest_neighbours(patches, self.distribution_coreset)[1][:, 0].view(n, h * w)
        optimizer = torch.optim.Adam(self.mlp.parameters(), lr=c["lr"])
        self.mlp.train()
        with torch.enable_grad():
            for _ in range(c["epochs"]):
                for batch in torch.randperm(n, generator=generator).split(c["batch_size"]):
                    logits = self.mlp(neighbourhood_features(maps[batch], c["neighbourhood"]))
                    loss = F.cross_entropy(logits, targets[batch].flatten())
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.eval()
        if self.refiner is not None:
            self._fit_refiner(torch.cat(images), generator)

    def _fit_refiner(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Train the refinement U-Net on simulated defects of the training images (module docstring)."""
        c = self._config
        with torch.no_grad():
            normal_maps = torch.cat([self._scores(chunk)[0] for chunk in images.split(c["batch_size"])])
        self.map_scale.fill_(float(torch.quantile(normal_maps.flatten()[:1_000_000], 0.99)) + 1e-12)
        optimizer = torch.optim.Adam(self.refiner.parameters(), lr=c["lr"])
        self.refiner.train()
        with torch.enable_grad():
            for _ in range(c["refinement_steps"]):
                picked = torch.randint(len(images), (c["batch_size"],), generator=generator)
                augmented, masks = simulate_anomalies(images[picked], probability=0.5)
                with torch.no_grad():
                    unrefined = self._scores(augmented)[0]
                logits = self._refine(augmented, unrefined)
                loss = focal_loss(logits, masks)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.refiner.eval()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("embedding_coreset", "distribution_coreset",
                                                       "embedding_to_distribution", "position_histogram"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def plausible_distance(self, distances: torch.Tensor, plausible: torch.Tensor) -> torch.Tensor:
        """min over plausible bank points of the distance; the nearest overall where none is plausible."""
        masked = distances.masked_fill(~plausible, float("inf")).amin(1)
        return torch.where(torch.isfinite(masked), masked, distances.amin(1))

    def _refine(self, images: torch.Tensor, unrefined: torch.Tensor) -> torch.Tensor:
        """The refiner's 2-class logits (B x 2 x H x W) from the grey image and the unrefined map / s."""
        return self.refiner(torch.cat([images.float().mean(1, keepdim=True), (unrefined / self.map_scale)[:, None]], 1))

    @torch.no_grad()
    def _scores(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unrefined anomaly map (B x H x W) and each score's map (neighbourhood, position, nearest)."""
        c = self._config
        maps = self.embed(images)
        b, d, h, w = maps.shape
        if h * w != len(self.position_histogram):
            raise DataError(f"PNI was fitted at {len(self.position_histogram)} patch positions but these images give "
                            f"{h}x{w}; score images of the training size")
        patches = maps.permute(0, 2, 3, 1).reshape(-1, d)
        neighbours = neighbourhood_features(maps, c["neighbourhood"])
        positions = torch.arange(h * w, device=maps.device).repeat(b)
        bank_size = len(self.embedding_coreset)
        scores = {"neighbourhood": [], "position": [], "nearest": []}
        chunk = max(1, CDIST_CHUNK_ELEMENTS // bank_size)
        for start in range(0, len(patches), chunk):
            part = slice(start, start + chunk)
            distances = torch.cdist(patches[part], self.embedding_coreset)  # Q x M
            p_neighbourhood = torch.softmax(self.mlp(neighbours[part]) / c["temperature"], dim=1)
            plausible_nb = p_neighbourhood[:, self.embedding_to_distribution] > c["neighbourhood_tau"] / bank_size
            plausible_pos = self.position_histogram[positions[part]] > c["position_tau"] / bank_size
            scores["neighbourhood"].append(self.plausible_distance(distances, plausible_nb))
            scores["position"].append(self.plausible_distance(distances, plausible_pos))
            scores["nearest"].append(distances.amin(1))
        out_maps = {}
        for name, values in scores.items():
            patch_map = torch.cat(values).view(b, 1, h, w)
            patch_map = F.interpolate(patch_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
            out_maps[name] = gaussian_blur(patch_map.squeeze(1), c["blur_sigma"])
        return (out_maps["neighbourhood"] + out_maps["position"]) / 2, out_maps

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.embedding_coreset.numel() == 0:
            raise AeflowError("PNI has not been fitted: call fit(loader) on normal images first")
        anomaly_map, out_maps = self._scores(images)
        out = {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map,
               **{f"score_{name}": m.flatten(1).amax(1) for name, m in out_maps.items()}}
        if self.refiner is not None:
            out["score_unrefined"] = out["pred_score"]
            out["anomaly_map"] = torch.softmax(self._refine(images, anomaly_map).float(), 1)[:, 1]
        return out
