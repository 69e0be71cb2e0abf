"""k-nearest neighbours on pooled frozen features: DN2 (Bergman, Cohen & Hoshen, "Deep nearest neighbor anomaly
detection", arXiv:2002.10445, 2020) with SPADE's pixel level (Cohen & Hoshen, "Sub-image anomaly detection with
deep pyramid correspondences", arXiv:2005.02357, 2020). The sanity check of the field: a model that does not beat
the distance to the nearest normal image in a pretrained feature space has learned little beyond ImageNet.

Nothing is trained. A frozen ImageNet backbone embeds every normal training image; global average pooling of its
deepest stage gives one vector per image, kept in a bank.

- Image score (DN2): the mean distance of a test image's pooled vector to its `k` nearest vectors in the bank,
  Euclidean (the papers' choice) or cosine (`metric`; computed as the Euclidean distance of unit vectors,
  sqrt(2 - 2 cos), which orders images as the cosine distance does and ignores the overall feature magnitude).
  k = 1 by default: DN2 reports its results changing little with k, and with a bank of a few hundred normals a
  larger k averages in neighbours that are already less alike; SPADE's image level uses K = 50.
- Pixel map (SPADE): the `pixel_images` training images nearest to the test image by that distance give a
  gallery of patch features (the stride-4, -8 and -16 stages concatenated at stride 4, the coarser ones
  up-sampled, as SPADE concatenates ResNet's three blocks); each test patch scores its distance to the nearest
  gallery patch (SPADE's kappa = 1), up-sampled to the image and Gaussian-smoothed (SPADE: sigma = 4). Restricting
  the search to the nearest images is SPADE's point: the patch must be explained by normal images that look like
  this one, not by any patch anywhere. With `pixel_level=False` no patch bank is kept and the map is the image
  score at every pixel (no localisation; pixel metrics then say nothing).

`score` chooses the image score: "image" (default) is DN2's pooled k-NN distance above, the baseline this model
exists for; "pixel" is the maximum of the SPADE map, which sees small local defects that barely move a pooled
vector (on the synthetic phantoms the pooled distance is near chance while the map's maximum separates the lesion
images, tests/models/test_classical.py). Both are returned as `score_image` and `score_pixel`.

Departures, honestly: DN2 and SPADE pool the last block of a ResNet (2048 values); the deepest stage read here is
the stride-16 one of aeflow.nn.backbones.FeatureStages (112 values for EfficientNet-Lite0, 1024 for
Wide-ResNet-50-2). Memory: the patch bank holds N x (H/4) x (W/4) x D floats (N = 1214 images at 64 px with
EfficientNet-Lite0, D = 176: 0.2 GB; at 256 px 3.5 GB), which `pixel_level=False` avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages, adopt_buffer_shapes, gaussian_blur

METRICS = ("euclidean", "cosine")
SCORES = ("image", "pixel")
DISTANCE_CHUNK_ELEMENTS = 2**25  # test patches x gallery patches held at once (128 MiB of float32)


@register("knn")
class KNN(AnomalyModel):
    """k-NN distance of pooled frozen `backbone` features (DN2), with SPADE's pixel map over the
    `pixel_images` nearest training images.

    k: neighbours averaged for the image score. metric: "euclidean" or "cosine". pixel_level: keep the patch bank
    for the map. blur_sigma: smoothing of the map in pixels. score: "image" (DN2) or "pixel" (max of the map;
    needs pixel_level).
    """

    trained_by_gradient = False

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, weights: str | None = None,
                 k: int = 1, metric: str = "euclidean", pixel_level: bool = True, pixel_images: int = 50,
                 blur_sigma: float = 4.0, score: str = "image"):
        super().__init__()
        if k < 1 or pixel_images < 1:
            raise ConfigError(f"k and pixel_images must be >= 1; got {k}, {pixel_images}")
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        if score not in SCORES or (score == "pixel" and not pixel_level):
            raise ConfigError(f"score must be one of {', '.join(SCORES)} ('pixel' needs pixel_level=True); got {score!r}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.register_buffer("bank", torch.empty(0))  # N x D pooled features, filled by fit()
        self.register_buffer("patch_bank", torch.empty(0))  # N x P x D' patch features at stride 4 (pixel_level)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled vectors (B x D) and, with pixel_level, patch features (B x D' x H/4 x W/4), each unit-normalised
        for the cosine metric."""
        stages = self.features(images)
        pooled = stages[-1].mean((2, 3))
        patches = None
        if self._config["pixel_level"]:
            size = stages[0].shape[-2:]
            patches = torch.cat([stages[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                               for f in stages[1:]], dim=1)
        if self._config["metric"] == "cosine":
            pooled = F.normalize(pooled, dim=1)
            patches = None if patches is None else F.normalize(patches, dim=1)
        return pooled, patches

    @torch.no_grad()
    def fit(self, loader) -> None:
        """Embed every normal training image into the banks."""
        device = self.bank.device
        pooled, patches = [], []
        for batch in loader:
            vectors, maps = self.embed(batch.image.to(device))
            pooled.append(vectors)
            if maps is not None:
                patches.append(maps.flatten(2).transpose(1, 2))
        if not pooled:
            raise DataError("the k-NN model needs training images; the loader was empty")
        self.bank = torch.cat(pooled)
        if patches:
            self.patch_bank = torch.cat(patches)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("bank", "patch_bank"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patch_distances(self, patches: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """B x P distance of every test patch (B x P x D') to the nearest patch of its own gallery, the patch
        features of its nearest training images (indices B x K), in bounded memory: one image's gallery at a
        time. While traced for export (aeflow.backends) the batch is done at once instead, so that the graph
        takes any batch size (a loop over the batch would be unrolled at the traced size); same distances."""
        if torch.jit.is_tracing():
            return self._gallery_distances(patches, self.patch_bank[nearest].flatten(1, 2))
        return torch.cat([self._gallery_distances(query[None], self.patch_bank[index].flatten(0, 1)[None])
                          for query, index in zip(patches, nearest)])

    @staticmethod
    def _gallery_distances(queries: torch.Tensor, galleries: torch.Tensor) -> torch.Tensor:
        """B x P nearest distances of queries (B x P x D') in galleries (B x G x D'), P in chunks that hold at
        most DISTANCE_CHUNK_ELEMENTS distances."""
        chunk = max(1, DISTANCE_CHUNK_ELEMENTS // (galleries.shape[0] * galleries.shape[1]))
        return torch.cat([torch.cdist(queries[:, i : i + chunk], galleries).amin(2)
                          for i in range(0, queries.shape[1], chunk)], 1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bank.numel() == 0:
            raise AeflowError("the k-NN model has not been fitted: call fit(loader) on normal images first")
        pooled, patches = self.embed(images)
        distances = torch.cdist(pooled, self.bank)
        k = min(self._config["k"], len(self.bank))
        score = distances.topk(k, dim=1, largest=False).values.mean(1)
        h, w = images.shape[-2:]
        if patches is None:
            return {"pred_score": score, "anomaly_map": score[:, None, None].expand(-1, h, w).contiguous()}
        b, _, ph, pw = patches.shape
        if ph * pw != self.patch_bank.shape[1]:
            raise DataError(f"the k-NN model was fitted at {self.patch_bank.shape[1]} patch positions but these "
                            f"images give {ph}x{pw}; score images of the training size")
        nearest = distances.topk(min(self._config["pixel_images"], len(self.bank)), dim=1, largest=False).indices
        patch_map = self.patch_distances(patches.flatten(2).transpose(1, 2), nearest).view(b, 1, ph, pw)
        anomaly_map = F.interpolate(patch_map, size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
        anomaly_map = gaussian_blur(anomaly_map, self._config["blur_sigma"])
        pixel_score = anomaly_map.flatten(1).amax(1)
        return {"pred_score": pixel_score if self._config["score"] == "pixel" else score, "anomaly_map": anomaly_map,
                "score_image": score, "score_pixel": pixel_score}
