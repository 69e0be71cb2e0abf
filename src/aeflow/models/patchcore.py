"""PatchCore: towards total recall in industrial anomaly detection (Roth et al., CVPR 2022, arXiv:2106.08265).

Nothing is trained. A frozen ImageNet backbone embeds every patch of the normal training images with
"locally aware" features: the stride-8 and stride-16 stages, each averaged over its 3 x 3 neighbourhood, the
coarser one up-sampled, concatenated. All patch embeddings form a memory bank, thinned by greedy coreset
subsampling to the patches that best cover it. A test patch scores its distance to the nearest memory-bank patch;
the image score is the largest patch score, optionally reweighted by how isolated that nearest neighbour is in the
bank (paper, eq. 7). The up-sampled, smoothed patch-score map is the anomaly map.

Memory and scale, honestly: fitting holds every training patch (N x (H/8) x (W/8) x D floats, D = 1536 for
Wide-ResNet-50-2) of its images, and the greedy coreset is sequential over that set. Under DDP
(aeflow.training.distributed) each rank embeds its share of the images and chooses its own coreset of the
same ratio, and torch.distributed gathers the per-rank coresets, concatenated in rank order: a bank of the same size, whose every
training patch is within its own shard's covering radius, but NOT the coreset one process would choose (the
greedy k-center selection over the whole bank cannot be sharded; a 1-rank and a 2-rank fit differ). Scoring
needs the whole (subsampled) bank on every device; distances are computed in chunks to bound memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages, adopt_buffer_shapes, gaussian_blur

CDIST_CHUNK_ELEMENTS = 2**25  # query x bank distances held at once (128 MiB of float32)
CANDIDATES_PER_PICK = 4  # greedy_coreset with block > 1: candidates per centre a round may add
CORESET_BLOCK = 64  # greedy_coreset: at most this many centres per round (1: one matrix-vector product per centre)


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int | None, generator: torch.Generator, *,
                   block: int = CORESET_BLOCK):
    """Indices of `size` distinct rows of `features` (N x D) chosen by greedy k-center selection (Sener & Savarese
    2018), in the order chosen.

    Each step adds the point farthest from those chosen so far, so the coreset covers the bank with the smallest
    largest gap. Distances are computed after a random Gaussian projection to `projection_dim` dimensions
    (Johnson-Lindenstrauss), as in the paper, which makes each step O(N * projection_dim); squared, as
    |x|^2 - 2 x.c + |c|^2 (one matrix-vector product per step).

    block > 1 (the same selection, faster; measured 0.18 s against 1.58 s for one centre per step on a 20000 x 384
    bank, 2000 centres, docs/benchmarks.md): each round takes the 4 * block points farthest from the coreset and
    runs the greedy among them alone, for up to `block` picks, while the pick is at least as far from the
    coreset as the farthest point outside the candidates was at the round's start (distances only shrink, so
    the pick is then the exact greedy's too); the bank's distances to the round's new centres are then updated
    with one matrix product instead of one product per centre.
    """
    n, dim = features.shape
    if not 1 <= size <= n:
        raise ConfigError(f"a coreset of {size} rows cannot be chosen from {n}")
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        features = features @ projection.to(features)
    squared = (features * features).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    gap = (squared - 2 * features @ features[first] + squared[first]).clamp_min_(0)  # squared distance to coreset
    gap[first] = -1.0  # chosen: never chosen again, even where the bank repeats a row
    to_one = torch.empty_like(gap)
    while len(chosen) < size:
        picks = min(block, size - len(chosen))
        if picks == 1:
            index = int(gap.argmax())
            torch.addmv(squared, features, features[index], alpha=-2, out=to_one)
            torch.minimum(gap, to_one.add_(squared[index]).clamp_min_(0), out=gap)
            gap[index] = -1.0
            chosen.append(index)
            continue
        top = gap.topk(min(n, CANDIDATES_PER_PICK * picks + 1))
        m = CANDIDATES_PER_PICK * picks
        candidates, outside = top.indices[:m], float(top.values[m]) if n > m else -1.0
        local = gap[candidates].clone()
        between = torch.cdist(features[candidates], features[candidates]).square_()
        new = []
        for _ in range(picks):
            j = int(local.argmax())
            if new and float(local[j]) < outside:  # a point outside the candidates may be farther: next round
                break
            new.append(int(candidates[j]))
            torch.minimum(local, between[j], out=local)
            local[j] = -1.0
        centres = torch.tensor(new, device=features.device)
        to_new = (squared[:, None] - 2 * features @ features[centres].T + squared[centres][None]).amin(1)
        torch.minimum(gap, to_new.clamp_min_(0), out=gap)
        gap[centres] = -1.0
        chosen += new
    return torch.tensor(chosen, device=features.device)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1):
    """Distances (Q x k) and indices (Q x k) of the k nearest bank rows of each query row, in bounded memory.

    |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b), and only the bracket decides which b are nearest: it is one matrix product
    of [q, 1] with [-2 b, |b|^2] per chunk (no pass over the Q x N matrix besides the product and the min / top-k);
    |q|^2 is added, and the result clamped and square-rooted, for the k kept per query only. With k = 1 a min
    replaces the top-k. Against torch.cdist + topk: AE-FLOW's memory predict 1.11-1.20x as fast at 64 px, PatchCore
    1.06-1.36x, over three runs of benchmarks/nearest_neighbours.py; the same scores.
    """
    chunk = max(1, CDIST_CHUNK_ELEMENTS // len(bank))
    augmented_bank = torch.cat([-2 * bank, (bank * bank).sum(1, keepdim=True)], dim=1).T
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        partial = torch.cat([q, torch.ones_like(q[:, :1])], dim=1) @ augmented_bank  # |b|^2 - 2 q.b
        if k == 1:
            values, index = partial.min(dim=1, keepdim=True)
        else:
            values, index = partial.topk(k, dim=1, largest=False)
        distances.append(values.add_((q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


@register("patchcore")
class PatchCore(AnomalyModel):
    """PatchCore with a frozen `backbone` (see aeflow.nn.backbones).

    coreset_ratio: fraction of training patches kept (the paper: 0.1 or 0.01; 1.0 keeps all).
    projection_dim: dimension of the random projection used only for coreset selection (None: none).
    reweight: apply the paper's eq. 7 with `num_neighbors` (b = 9) to the image score; the map is unaffected.
    """

    trained_by_gradient = False

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        reweight: bool = True,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1]; got {coreset_ratio}")
        if num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1; got {num_neighbors}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.register_buffer("memory_bank", torch.empty(0))  # M x D, filled by fit()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D x H/8 x W/8 locally aware patch features: 3x3-averaged stride-8 and stride-16 stages."""
        _, mid, deep = self.features(images)
        mid, deep = (F.avg_pool2d(f, 3, stride=1, padding=1) for f in (mid, deep))
        deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([mid, deep], dim=1)

    @torch.no_grad()
    def fit(self, loader) -> None:
        """Collect the patches of all training images, then keep a greedy coreset of them (under DDP: of each rank's
        images, then the ranks' coresets together)."""
        device = self.memory_bank.device
        patches = [self.embed(batch.image.to(device)).permute(0, 2, 3, 1).flatten(0, 2) for batch in loader]
        if not patches:
            raise DataError("PatchCore needs training images; the loader was empty")
        bank = torch.cat(patches)
        size = max(1, round(self._config["coreset_ratio"] * len(bank)))
        if size < len(bank):
            generator = torch.Generator().manual_seed(self._config["seed"])
            bank = bank[greedy_coreset(bank, size, self._config["projection_dim"], generator)]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, bank.cpu())
            bank = torch.cat(parts).to(device)
        self.memory_bank = bank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, ("memory_bank",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reweighted(self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 for each image's most anomalous patch: s = (1 - softmax of its distances to the b nearest
        bank neighbours of m* (m* first), taken at m*) * s*. A test patch whose nearest bank patch m* sits in
        a sparse region of the bank (far from its neighbours) keeps more of its score than one next to a dense
        cluster of normal patches."""
        b, p = distances.shape
        top = distances.argmax(1)
        test_patch = patches.view(b, p, -1)[torch.arange(b), top]
        star = self.memory_bank[nearest[torch.arange(b), top]]
        k = min(self._config["num_neighbors"], len(self.memory_bank))
        _, neighbourhood = nearest_neighbours(star, self.memory_bank, k)  # B x k, m* itself first
        to_neighbours = torch.linalg.vector_norm(self.memory_bank[neighbourhood] - test_patch[:, None], dim=-1)
        weight = 1 - torch.softmax(to_neighbours, dim=1)[:, 0]
        return weight * distances.amax(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.memory_bank.numel() == 0:
            raise AeflowError("PatchCore has not been fitted: call fit(loader) on normal images first")
        x = self.embed(images)
        b, _, h, w = x.shape
        patches = x.permute(0, 2, 3, 1).flatten(0, 2)
        distance, index = nearest_neighbours(patches, self.memory_bank)
        distances, nearest = distance.view(b, h * w), index.view(b, h * w)
        patch_map = F.interpolate(distances.view(b, 1, h, w), size=images.shape[-2:], mode="bilinear",
                                  align_corners=False)
        anomaly_map = gaussian_blur(patch_map.squeeze(1), self._config["blur_sigma"])
        score = self.reweighted(patches, distances, nearest) if self._config["reweight"] else distances.amax(1)
        return {"pred_score": score, "anomaly_map": anomaly_map}

