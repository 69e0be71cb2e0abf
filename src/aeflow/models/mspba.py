"""MSPBA: multi-scale patch-based representation learning for image anomaly detection and segmentation (Tsai, Wu
and Lai, WACV 2022).

No pretrained network: an encoder per patch scale learns, from normal images alone and by self-supervision, what a
normal patch looks like; anomalies are patches whose embedding is far from every normal patch's.

Encoders. One small convolutional encoder per patch size (the paper: 64, 32 and 16 pixels at 256 px) maps a patch
to an embedding: stride-2 convolution stages down to 2 x 2 (aeflow.nn.blocks.ConvEncoder), then a linear layer.

Self-supervised objectives (together, at every scale):
- contrastive: two random views of the same patch (a shift of up to 1/8 of its size, brightness/contrast jitter,
  noise) must be nearer to each other than to the other patches of the batch: the NT-Xent loss of SimCLR (Chen et
  al. 2020) on the L2-normalised embeddings, temperature `temperature`;
- position classification: from the embeddings of a patch and of one of its 8 neighbours, a small classifier
  predicts where the neighbour lies (Doersch et al. 2015; Patch SVDD, Yi and Yoon 2020), which forces the embedding
  to encode the patch's structure, not only its texture statistics.
L = L_contrastive + position_weight * L_position.

Memory and score. After training, every patch of every training image on a grid of stride P / 2 is embedded; each
scale keeps a memory of normal embeddings (the greedy coreset of PatchCore, at most `memory_size`, drawn from at
most `candidates_per_image` random patches of each training image so that the selection stays fast). A test patch
scores its distance to the nearest memory embedding; each pixel takes the mean score of the patches that cover it;
the scales' maps are multiplied (their geometric mean, as Patch SVDD fuses its scales, so no scale's units dominate),
smoothed, and the image score is the maximum. Each scale's maximum is also returned as a score component.

Where this departs from the paper, and why: the encoders are small and trained for `steps` Adam steps (seconds on a
CPU, the paper trains far longer on a GPU); the patch sizes do not follow the image size by themselves: at 64 px
give patch_sizes [32, 16, 8] (the paper's 64/32/16 would leave one 64-pixel patch per image); the neighbour offset
of the position task is min(P, (H - P) / 2 - P / 8), so that a patch and its neighbour fit in small images; the
memory is a coreset of the training patches rather than all of them. Training is not driven by the shared epoch
loop: the memory needs a pass over the training images after training, so `fit` does both.
Status: on the 64 px synthetic phantoms (patch sizes 32/16/8, 60 steps) image AUROC 0.89 and pixel AUROC 0.90
(tests/models/test_feature_banks.py). On the two boards, with 150 steps, it is weak
(docs/results/rows_feature_banks.md): encoders trained for seconds from scratch are far from frozen ImageNet
features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.patchcore import greedy_coreset, nearest_neighbours
from aeflow.nn.blocks import ConvEncoder, adopt_buffer_shapes, gaussian_blur

# The 8 neighbours of the position task, as (row, column) steps.
NEIGHBOUR_STEPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class PatchEncoder(nn.Module):
    """B x C x P x P patches -> B x dim embeddings: stride-2 stages down to 2 x 2, then a linear layer."""

    def __init__(self, in_channels: int, patch_size: int, dim: int, base_width: int):
        super().__init__()
        stages = int(math.log2(patch_size)) - 1
        widths = [min(base_width * 2**i, 4 * base_width) for i in range(stages)]
        self.convs = ConvEncoder(in_channels, widths)
        self.head = nn.Linear(self.convs.out_channels * 4, dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(patches).flatten(1))


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its patch, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(first)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


def augment(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness/contrast jitter and a little noise: what two views of one patch may differ by."""
    b = len(patches)
    scale = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.02 * torch.randn(patches.shape, generator=generator)
    return patches * scale.to(patches) + shift.to(patches) + noise.to(patches)


def crop(images: torch.Tensor, index: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Patches images[index[i], :, top[i]:top[i]+size, left[i]:left[i]+size], B x C x size x size."""
    rows = (top[:, None] + torch.arange(size))[:, None, :, None]
    cols = (left[:, None] + torch.arange(size))[:, None, None, :]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return images[index[:, None, None, None], channels, rows, cols]


@register("mspba")
class MSPBA(AnomalyModel):
    """MSPBA with one encoder per entry of `patch_sizes` (powers of two >= 4; the paper: 64, 32, 16 at 256 px).

    dim, base_width: embedding size and encoder width. steps, batch_size, lr: the self-supervised training (Adam).
    temperature, position_weight: the contrastive temperature and the position loss's weight. memory_size,
    candidates_per_image: the per-scale memory (coreset size) and how many random grid patches per training image
    it is chosen from.
    """

    trained_by_gradient = False  # fit() trains the encoders, then builds the memory (see the module doc)

    def __init__(
        self,
        in_channels: int = 1,
        patch_sizes: tuple[int, ...] = (64, 32, 16),
        dim: int = 64,
        base_width: int = 16,
        steps: int = 300,
        batch_size: int = 64,
        lr: float = 1e-3,
        temperature: float = 0.5,
        position_weight: float = 1.0,
        memory_size: int = 2048,
        candidates_per_image: int = 32,
        projection_dim: int | None = None,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if not patch_sizes or any(p < 4 or p & (p - 1) for p in patch_sizes):
            raise ConfigError(f"patch_sizes must be powers of two >= 4; got {list(patch_sizes)}")
        if min(dim, base_width, steps + 1, batch_size - 1, memory_size, candidates_per_image) < 1 or temperature <= 0:
            raise ConfigError("dim, base_width, memory_size, candidates_per_image >= 1, steps >= 0, batch_size >= 2 "
                              "and temperature > 0 are needed")
        self.patch_sizes = tuple(patch_sizes)
        self.encoders = nn.ModuleList(PatchEncoder(in_channels, p, dim, base_width) for p in self.patch_sizes)
        self.position_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, len(NEIGHBOUR_STEPS)))
            for _ in self.patch_sizes)
        for p in self.patch_sizes:
            self.register_buffer(f"memory_{p}", torch.empty(0))

    def check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if min(h, w) < 2 * max(self.patch_sizes):
            raise DataError(f"MSPBA with patch sizes {list(self.patch_sizes)} needs images of at least "
                            f"{2 * max(self.patch_sizes)} px per side; got {h}x{w}")

    def pretext_losses(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The contrastive and position losses of one batch of patches per scale, drawn from `images`."""
        c = self._config
        n, _, h, w = images.shape
        b = c["batch_size"]
        contrastive, position = images.new_zeros(()), images.new_zeros(())
        for size, encoder, head in zip(self.patch_sizes, self.encoders, self.position_heads):
            jitter = max(1, size // 8)
            offset = min(size, (min(h, w) - size) // 2 - jitter)
            index = torch.randint(n, (b,), generator=generator)
            # anchors leave room for a neighbour at +-offset and a view shifted by up to jitter
            margin = offset + jitter
            top = torch.randint(margin, h - size - margin + 1, (b,), generator=generator)
            left = torch.randint(margin, w - size - margin + 1, (b,), generator=generator)
            shift = torch.randint(-jitter, jitter + 1, (2, b), generator=generator)
            first = augment(crop(images, index, top, left, size), generator)
            second = augment(crop(images, index, top + shift[0], left + shift[1], size), generator)
            where = torch.randint(len(NEIGHBOUR_STEPS), (b,), generator=generator)
            steps = torch.tensor(NEIGHBOUR_STEPS)[where]
            small = torch.randint(-jitter // 2, jitter // 2 + 1, (2, b), generator=generator)
            neighbour = crop(images, index, top + steps[:, 0] * offset + small[0],
                             left + steps[:, 1] * offset + small[1], size)
            z_first, z_second, z_neighbour = encoder(torch.cat([first, second, neighbour])).split(b)
            contrastive = contrastive + nt_xent(z_first, z_second, c["temperature"])
            logits = head(torch.cat([z_first, z_neighbour], dim=1))
            position = position + F.cross_entropy(logits, where.to(logits.device))
        contrastive, position = contrastive / len(self.patch_sizes), position / len(self.patch_sizes)
        return {"loss": contrastive + c["position_weight"] * position, "contrastive": contrastive,
                "position": position}

    def grid_patches(self, images: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """All patches on the stride size/2 grid: (B L) x C x size x size, and the grid's (rows, cols)."""
        stride = size // 2
        b, channels, h, w = images.shape
        unfolded = F.unfold(images, size, stride=stride)  # B x (C size size) x L
        rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
        return unfolded.transpose(1, 2).reshape(-1, channels, size, size), (rows, cols)

    def embed_grid(self, images: torch.Tensor, scale: int) -> tuple[torch.Tensor, tuple[int, int]]:
        patches, grid = self.grid_patches(images, self.patch_sizes[scale])
        return torch.cat([self.encoders[scale](part) for part in patches.split(4096)]), grid

    def fit(self, loader) -> None:
        c = self._config
        device = self.position_heads[0][0].weight.device
        images = [batch.image.to(device) for batch in loader]
        if not images:
            raise DataError("MSPBA needs training images; the loader was empty")
        images = torch.cat(images)
        self.check_size(images)
        generator = torch.Generator().manual_seed(c["seed"])
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=c["lr"])
        self.train()
        with torch.enable_grad():
            for _ in range(c["steps"]):
                loss = self.pretext_losses(images, generator)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.eval()
        with torch.no_grad():
            for scale, size in enumerate(self.patch_sizes):
                embeddings = torch.cat([self.embed_grid(part, scale)[0] for part in images.split(64)])
                candidates = c["candidates_per_image"] * len(images)
                if len(embeddings) > candidates:
                    chosen = torch.randperm(len(embeddings), generator=generator)[:candidates]
                    embeddings = embeddings[chosen.to(device)]
                if len(embeddings) > c["memory_size"]:
                    embeddings = embeddings[greedy_coreset(embeddings, c["memory_size"], c["projection_dim"],
                                                           generator)]
                setattr(self, f"memory_{size}", embeddings.contiguous())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, [f"memory_{p}" for p in self.patch_sizes])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if getattr(self, f"memory_{self.patch_sizes[0]}").numel() == 0:
            raise AeflowError("MSPBA has not been fitted: call fit(loader) on normal images first")
        self.check_size(images)
        b, _, h, w = images.shape
        maps = {}
        for scale, size in enumerate(self.patch_sizes):
            embeddings, (rows, cols) = self.embed_grid(images, scale)
            distances = nearest_neighbours(embeddings, getattr(self, f"memory_{size}"))[0][:, 0]
            # each pixel: the mean score of the patches covering it (fold sums, the count divides)
            spread = distances.view(b, 1, rows * cols).expand(b, size * size, rows * cols)
            covered = (rows - 1) * (size // 2) + size, (cols - 1) * (size // 2) + size
            total = F.fold(spread, covered, size, stride=size // 2)
            count = F.fold(torch.ones_like(spread), covered, size, stride=size // 2)
            pixel = (total / count).squeeze(1)
            if covered != (h, w):  # the grid leaves a strip at the right / bottom: it takes its neighbours' values
                pixel = F.pad(pixel[:, None], (0, w - covered[1], 0, h - covered[0]), mode="replicate")[:, 0]
            maps[size] = pixel
        fused = torch.stack([m.clamp_min(1e-12).log() for m in maps.values()]).mean(0).exp()
        anomaly_map = gaussian_blur(fused, self._config["blur_sigma"])
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map,
                **{f"score_patch{size}": m.flatten(1).amax(1) for size, m in maps.items()}}
