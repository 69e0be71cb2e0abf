"""MemSeg: a semi-supervised method for image surface defect detection using differences and commonalities (Yang,
Xu, Zhou, Shi and Li, 2022, arXiv:2205.00908).

Training sees normal images only and makes its own defects (section 3.2): a Perlin-noise mask cuts irregular
regions out of a normal image and fills them with a foreign texture, so the model is trained, like a supervised
segmenter, to find them. The network is a U-Net whose encoder is a frozen ImageNet backbone, with two additions:

1. A memory of normal features (section 3.3): the encoder's multi-scale features of N normal training images
   (the paper: N = 30 at strides 4, 8 and 16). For an input, the memory item with the smallest summed L2 distance
   over the three scales is its best match, and the difference information DI = (input - best match)^2 at each
   scale is concatenated with the input's features: the "difference" (what differs from normal) next to the
   "commonality" (what the input is).
2. Spatial-attention multi-scale feature fusion (section 3.4): each concatenated level passes a 3x3 convolution
   and a coordinate-attention block (channel attention that keeps position, Hou et al. 2021), the levels are fused
   top-down (coarser up-sampled into finer), and each is multiplied by a spatial attention map built from the
   difference information: M3 = mean_c DI3, M2 = up(M3) * mean_c DI2, M1 = up(M2) * mean_c DI1.

The fused levels are the skip connections of a U-Net-like decoder (section 3.5) whose bottom is a trainable
stride-32 block on the stride-16 features (the paper trains ResNet-18's last stage), with two more up-sampling
steps to the input resolution and a 2-class head. Loss (section 3.6): L1 between the predicted anomaly probability
and the mask (weight 0.6) plus focal loss (weight 0.4; gamma 4 as in the paper's setting). Map: the predicted
anomaly probability; image score: the mean of its top values (the paper's code: the top 100 pixels of a 256 x 256
map, i.e. a fraction of 100 / 65536 of the image, kept as a fraction here so it scales with the image).

Departures: the anomaly synthesis is DRAEM's here (aeflow.models.draem.simulate_anomalies): Perlin mask, foreign
texture or a flipped neighbour, blend factor in [0.1, 1]; MemSeg's own differs in using DTD textures (not available
offline) and a foreground mask of the object and a patch shuffle of the image itself as extra sources. The encoder
is any of aeflow.nn.backbones at strides 4, 8 and 16 (EfficientNet-Lite0 by default, frozen whole; the paper's
ResNet-18 has its first three stages frozen). The memory is filled from the first training images the model sees
(the paper samples N training images at random before training; a loader shuffles them anyway); until it is
filled (only lightning's validation sanity check runs before the first training step) the other images of the same
batch stand in for it. Under DDP each process fills its memory from its own batches.

Status: on the 64 px synthetic phantoms a decoder of width 16 with a memory of 16 images, every training image
augmented, gives image AUROC 0.65-0.69 and pixel AUROC 0.85-0.93 after 300 Adam steps (seeds 0, 1, 2;
tests/models/test_uniad_memseg_zeroshot.py). Board rows: docs/results/rows_uniad_memseg_zeroshot.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.models.draem import focal_loss, simulate_anomalies
from aeflow.nn.blocks import FeatureStages, adopt_buffer_shapes, conv_bn_act, top_k_mean

# --- memory of normal features ---------------------------------------------------------------------------------


def best_match_difference(features: list[torch.Tensor], memory: list[torch.Tensor]) -> list[torch.Tensor]:
    """Difference information DI* per scale (paper, eqs. 1-2): (input - best-matching memory item)^2.

    features[l]: B x C_l x h_l x w_l; memory[l]: N x C_l x h_l x w_l. The best match minimises the sum over scales
    of ||input_l - memory_l||_2 (each scale's whole feature map as one vector)."""
    distance = sum(torch.cdist(f.flatten(1), m.flatten(1)) for f, m in zip(features, memory))  # B x N
    best = distance.argmin(1)
    return [(f - m[best]).pow(2) for f, m in zip(features, memory)]


# --- spatial-attention multi-scale feature fusion ---------------------------------------------------------------


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou, Zhou and Feng, CVPR 2021), the channel attention MemSeg's fusion uses: pool along
    each axis, a shared 1x1 convolution, and two sigmoid gates that weight channels per row and per column."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.shared = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.gate_h = nn.Conv2d(hidden, channels, 1)
        self.gate_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        along_h, along_w = self.shared(pooled).split([h, w], dim=2)
        return x * self.gate_h(along_h).sigmoid() * self.gate_w(along_w.transpose(2, 3)).sigmoid()


class MultiScaleFeatureFusion(nn.Module):
    """Concatenated [features, DI] per scale -> fused skip features (finest first), each weighted by its spatial
    attention map from the difference information."""

    def __init__(self, channels: list[int], widths: list[int]):
        super().__init__()
        self.level = nn.ModuleList(nn.Sequential(conv_bn_act(2 * c, w), CoordinateAttention(w))
                                   for c, w in zip(channels, widths))
        # Top-down: the coarser fused level, up-sampled, is added to the finer one.
        self.top_down = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                                    conv_bn_act(coarse, fine))
                                      for fine, coarse in zip(widths[:-1], widths[1:]))

    def forward(self, features: list[torch.Tensor], differences: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [block(torch.cat([f, d], dim=1)) for block, f, d in zip(self.level, features, differences)]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + self.top_down[i](levels[i + 1])
        attention = [differences[-1].mean(1, keepdim=True)]
        for d in reversed(differences[:-1]):
            up = F.interpolate(attention[0], size=d.shape[-2:], mode="bilinear", align_corners=False)
            attention.insert(0, up * d.mean(1, keepdim=True))
        return [level * a for level, a in zip(levels, attention)]


# --- U-Net-like segmentation decoder ---------------------------------------------------------------------------


class UpBlock(nn.Module):
    """Double the size, concatenate the skip (if any), two 3x3 convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(conv_bn_act(in_channels + skip_channels, out_channels),
                                  conv_bn_act(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class SegmentationDecoder(nn.Module):
    """Stride 32 -> 16 -> 8 -> 4 with the fused skips, then -> 2 -> 1 without, and a 2-class head."""

    def __init__(self, bottom_channels: int, skip_widths: list[int], width: int):
        super().__init__()
        fine, mid, coarse = skip_widths
        self.up16 = UpBlock(bottom_channels, coarse, 4 * width)
        self.up8 = UpBlock(4 * width, mid, 2 * width)
        self.up4 = UpBlock(2 * width, fine, width)
        self.up2 = UpBlock(width, 0, width)
        self.up1 = UpBlock(width, 0, width)
        self.head = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, bottom: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.up16(bottom, skips[2])
        x = self.up8(x, skips[1])
        x = self.up4(x, skips[0])
        return self.head(self.up1(self.up2(x)))


# --- the model ------------------------------------------------------------------------------------------------


@register("memseg")
class MemSeg(AnomalyModel):
    """MemSeg over a frozen `backbone` (see aeflow.nn.backbones, read at strides 4, 8, 16).

    memory_size: N normal images in the memory (the paper: 30). width: channels of the decoder's finest level
    (the coarser ones 2x and 4x; fused skips have width, 2 width, 4 width). anomaly_probability: share of training
    images that get a synthetic defect (the paper gives none; 0.5 as DRAEM). l1_weight / focal_weight /
    focal_gamma: the paper's 0.6 / 0.4 / 4. topk_fraction: share of the map's top pixels averaged into the image
    score (100 / 65536: the paper's top 100 at 256 px).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        weights: str | None = None,
        memory_size: int = 30,
        width: int = 32,
        anomaly_probability: float = 0.5,
        l1_weight: float = 0.6,
        focal_weight: float = 0.4,
        focal_gamma: float = 4.0,
        topk_fraction: float = 100 / 65536,
    ):
        super().__init__()
        if memory_size < 1:
            raise ConfigError(f"memory_size must be >= 1; got {memory_size}")
        if not 0 < anomaly_probability <= 1:
            raise ConfigError(f"anomaly_probability must be in (0, 1]; got {anomaly_probability}")
        if not 0 < topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1]; got {topk_fraction}")
        if width < 1:
            raise ConfigError(f"width must be >= 1; got {width}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        channels = list(self.features.out_channels)
        skip_widths = [width, 2 * width, 4 * width]
        self.fusion = MultiScaleFeatureFusion(channels, skip_widths)
        self.bottom = nn.Sequential(conv_bn_act(channels[-1], 8 * width, stride=2), conv_bn_act(8 * width, 8 * width))
        self.decoder = SegmentationDecoder(8 * width, skip_widths, width)
        for i in range(len(channels)):  # N x C_l x h_l x w_l per scale, filled by training
            self.register_buffer(f"memory{i}", torch.empty(0))

    # The memory ---------------------------------------------------------------------------------------------

    def memory(self) -> list[torch.Tensor]:
        return [getattr(self, f"memory{i}") for i in range(len(self.features.out_channels))]

    def _memory_count(self) -> int:
        return self.memory0.shape[0] if self.memory0.numel() else 0

    def _remember(self, features: list[torch.Tensor]) -> None:
        """Add normal images' features until the memory holds memory_size items."""
        held = self.memory()
        room = self._config["memory_size"] - self._memory_count()
        for i, f in enumerate(features):
            new = f[:room].detach()
            setattr(self, f"memory{i}", torch.cat([held[i], new]) if held[i].numel() else new.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, [f"memory{i}" for i in range(len(self.features.out_channels))])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _differences(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        memory = self.memory()
        if memory[0].numel() == 0:
            if features[0].shape[0] < 2:
                raise DataError("MemSeg's memory is empty (the model is untrained) and a single image has no other "
                                "image to compare with: train the model first")
            # Before the first training step: the other images of the batch stand in for the memory.
            per_image = [best_match_difference([f[i:i + 1] for f in features],
                                               [torch.cat([f[:i], f[i + 1:]]) for f in features])
                         for i in range(features[0].shape[0])]
            return [torch.cat([d[level] for d in per_image]) for level in range(len(features))]
        if memory[0].shape[1:] != features[0].shape[1:]:
            raise DataError(f"MemSeg's memory holds {tuple(memory[0].shape[-2:])} positions at stride 4 but "
                            f"these images give {tuple(features[0].shape[-2:])}: score images of the training size")
        return best_match_difference(features, memory)

    # Network, loss, score ------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits B x 2 x H x W."""
        with torch.no_grad():
            features = self.features(images)
        skips = self.fusion(features, self._differences(features))
        logits = self.decoder(self.bottom(features[-1]), skips)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False) \
            if logits.shape[-2:] != images.shape[-2:] else logits

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.training and self._memory_count() < self._config["memory_size"]:
            with torch.no_grad():
                self._remember(self.features(batch.image))
        augmented, masks = simulate_anomalies(batch.image, self._config["anomaly_probability"])
        logits = self(augmented)
        l1 = (logits.softmax(1)[:, 1] - masks).abs().mean()
        focal = focal_loss(logits, masks, gamma=self._config["focal_gamma"])
        total = self._config["l1_weight"] * l1 + self._config["focal_weight"] * focal
        return {"loss": total, "l1": l1, "focal": focal}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        anomaly_map = self(images).softmax(1)[:, 1]
        return {"pred_score": top_k_mean(anomaly_map, self._config["topk_fraction"]), "anomaly_map": anomaly_map}
