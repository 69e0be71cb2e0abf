"""UniAD: a unified model for multi-class anomaly detection (You et al., NeurIPS 2022, arXiv:2206.03687).

A frozen ImageNet backbone gives multi-scale features; they are resized to one grid of h x w tokens and
concatenated (the paper: EfficientNet-B4 stages 1-4 at 14 x 14, 272 channels). A transformer reconstructs the
tokens and the reconstruction error is the anomaly map. A reconstruction network that can copy its input
reconstructs anomalies too: the paper calls it the "identical shortcut" and closes it three ways.

1. Neighbour-masked attention (paper, section 3.3): in every attention of the encoder and the decoder a token may
   not attend to the k x k neighbourhood around its own position (k = 7 on 14 x 14), so it cannot look up itself or
   the tokens that look like it; it has to infer its features from farther context.
2. Layer-wise learnable queries (section 3.2): each decoder layer starts from a learned query embedding of its own,
   not from its input, and receives the input only through (masked) attention: to the encoder's output, then to
   the previous decoder layer's output.
3. Feature jittering (section 3.4): during training the input tokens get Gaussian noise with standard deviation
   alpha * ||f|| / C per token (alpha = 20, applied with probability 1) and the target stays the clean tokens, so
   the model learns to denoise towards normal features rather than to copy.

Score (section 3.5): the anomaly map is the L2 norm over channels of (reconstructed - input) tokens, up-sampled
to the image and smoothed; the image score is its maximum (the paper's code takes the maximum of an average-
pooled map; a Gaussian smoothing serves the same purpose here, as in PaDiM and PatchCore).

Departures from the paper: the backbone is any of aeflow.nn.backbones read at strides 4, 8 and 16 (EfficientNet-
Lite0 by default: 24 + 40 + 112 = 176 channels, real ImageNet weights offline), not EfficientNet-B4's stages 1-4;
the positional embedding is a learned row + column embedding (the paper's code has this "learned" option besides
the sine one); the paper trains one model on all 15 MVTec classes ("unified"), here a model is trained on whatever
normal images it is given. Sizes follow the paper (256-dim tokens, 8 heads, 4 encoder and 4 decoder layers,
1024-dim feed-forward); the grid defaults to 14 x 14 whatever the image size.

Status: on the 64 px synthetic phantoms a model of one encoder and one decoder layer (64-dim tokens, 8 x 8 grid,
jitter 2) trained for 300 Adam steps gives image AUROC 0.75 and pixel AUROC 0.94 (tests/models/
test_uniad_memseg_zeroshot.py); with the paper's jitter 20 it stays near the mean at that budget (0.56 / 0.84). The
same tests measure the shortcut: with mask and jitter a corrupted block of tokens passes into the reconstruction
about 7 times less than without them. Board rows: docs/results/rows_uniad_memseg_zeroshot.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages, gaussian_blur

# --- neighbour-masked attention --------------------------------------------------------------------------------


def neighbour_mask(height: int, width: int, neighbourhood: int) -> torch.Tensor:
    """(h w) x (h w) boolean mask, True where query token i may NOT attend to key token j: j lies in the
    neighbourhood x neighbourhood window centred on i (clipped at the borders), i itself included."""
    if neighbourhood < 1:
        raise ConfigError(f"neighbourhood must be >= 1; got {neighbourhood}")
    # On the CPU even while a model is built on the "meta" device (run-folder checks): the check below reads values.
    ys, xs = torch.meshgrid(torch.arange(height, device="cpu"), torch.arange(width, device="cpu"), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    radius = neighbourhood // 2
    near_y = (ys[:, None] - ys[None, :]).abs() <= radius
    near_x = (xs[:, None] - xs[None, :]).abs() <= radius
    mask = near_y & near_x
    if mask.all(1).any():  # a query with no key left would attend to nothing (NaN)
        raise ConfigError(f"a {neighbourhood} x {neighbourhood} neighbourhood covers the whole {height} x {width} "
                          f"token grid for some positions; use a smaller neighbourhood or a larger feature_size")
    return mask


class MaskedAttention(nn.Module):
    """Multi-head attention whose queries skip the keys that `mask` marks (nn.MultiheadAttention's boolean
    attn_mask: True = not allowed), followed by the residual connection and LayerNorm (post-norm, as UniAD)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, residual, query, key, value, mask, need_weights: bool = False):
        out, weights = self.attention(query, key, value, attn_mask=mask, need_weights=need_weights,
                                      average_attn_weights=False)
        return self.norm(residual + self.dropout(out)), weights


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class EncoderLayer(nn.Module):
    """Masked self-attention + feed-forward; positions are added to queries and keys, not to values (DETR-style)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attention = MaskedAttention(dim, heads, dropout)
        self.feed_forward = FeedForward(dim, hidden, dropout)

    def forward(self, x, pos, mask):
        x, _ = self.self_attention(x, x + pos, x + pos, x, mask)
        return self.feed_forward(x)


class DecoderLayer(nn.Module):
    """A layer-wise learnable query (one per token position) attends to the encoder's output (`memory`), then to
    the previous layer's output (`previous`), both with the neighbour mask; then feed-forward.

    The query, not the input, is the residual stream: whatever the layer knows of its input came through masked
    attention, so token i's output does not depend directly on the inputs in i's neighbourhood."""

    def __init__(self, tokens: int, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.query = nn.Parameter(torch.empty(tokens, dim).normal_(0, 1))  # nn.Embedding's initialisation
        self.memory_attention = MaskedAttention(dim, heads, dropout)
        self.previous_attention = MaskedAttention(dim, heads, dropout)
        self.feed_forward = FeedForward(dim, hidden, dropout)

    def forward(self, previous, memory, pos, mask):
        q = self.query.expand(memory.shape[0], -1, -1)
        q, _ = self.memory_attention(q, q + pos, memory + pos, memory, mask)
        q, _ = self.previous_attention(q, q + pos, previous + pos, previous, mask)
        return self.feed_forward(q)


class ReconstructionTransformer(nn.Module):
    """Tokens B x P x C_in -> reconstructed tokens B x P x C_in: linear projection to `dim`, encoder, decoder with
    layer-wise queries, linear projection back. `masked=False` drops the neighbour mask (for comparison only)."""

    def __init__(self, in_dim: int, grid: tuple[int, int], dim: int, heads: int, hidden: int, encoder_layers: int,
                 decoder_layers: int, neighbourhood: int, dropout: float, masked: bool = True):
        super().__init__()
        h, w = grid
        self.input_projection = nn.Linear(in_dim, dim)
        self.output_projection = nn.Linear(dim, in_dim)
        self.row_embedding = nn.Parameter(torch.rand(h, dim // 2))  # nn.init.uniform_, as in UniAD's learned pos
        self.col_embedding = nn.Parameter(torch.rand(w, dim - dim // 2))
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, hidden, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(h * w, dim, heads, hidden, dropout) for _ in range(decoder_layers))
        mask = neighbour_mask(h, w, neighbourhood) if masked else torch.zeros(h * w, h * w, dtype=torch.bool,
                                                                               device="cpu")
        self.register_buffer("mask", mask, persistent=False)  # derived from the config, not state

    def position(self) -> torch.Tensor:
        h, w = self.row_embedding.shape[0], self.col_embedding.shape[0]
        rows = self.row_embedding[:, None].expand(h, w, -1)
        cols = self.col_embedding[None].expand(h, w, -1)
        return torch.cat([rows, cols], dim=-1).flatten(0, 1)  # P x dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos, mask = self.position(), self.mask
        memory = self.input_projection(tokens)
        for layer in self.encoder:
            memory = layer(memory, pos, mask)
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, mask)
        return self.output_projection(out)


def jitter(tokens: torch.Tensor, scale: float, probability: float) -> torch.Tensor:
    """Feature jittering (paper, eq. 5): with `probability`, add N(0, (scale * ||f_token|| / C)^2) noise to every
    token of the batch; C is the number of channels."""
    if scale <= 0 or torch.rand(()) > probability:
        return tokens
    sigma = scale * tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + sigma * torch.randn_like(tokens)


# --- the model ------------------------------------------------------------------------------------------------


@register("uniad")
class UniAD(AnomalyModel):
    """UniAD over a frozen `backbone` (see aeflow.nn.backbones); the paper's sizes by default.

    feature_size: side of the token grid every stage is resized to (the paper: 14). neighbourhood: side of the
    masked window (the paper: 7; 1 masks only the token itself). jitter_scale / jitter_probability: the paper's
    alpha = 20 and p = 1 (scale 0 turns jittering off). neighbour_masking=False drops the mask: only for measuring
    what the mask does, it re-opens the identical shortcut. blur_sigma: smoothing of the map in image pixels.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        weights: str | None = None,
        feature_size: int = 14,
        hidden_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        neighbourhood: int = 7,
        neighbour_masking: bool = True,
        jitter_scale: float = 20.0,
        jitter_probability: float = 1.0,
        dropout: float = 0.1,
        blur_sigma: float = 4.0,
    ):
        super().__init__()
        if feature_size < 2:
            raise ConfigError(f"feature_size must be >= 2; got {feature_size}")
        if hidden_dim % num_heads:
            raise ConfigError(f"hidden_dim ({hidden_dim}) must be a multiple of num_heads ({num_heads})")
        if encoder_layers < 0 or decoder_layers < 1:
            raise ConfigError("UniAD needs encoder_layers >= 0 and decoder_layers >= 1")
        if jitter_scale < 0 or not 0 <= jitter_probability <= 1:
            raise ConfigError(f"jitter_scale must be >= 0 and jitter_probability in [0, 1]; got {jitter_scale}, "
                              f"{jitter_probability}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        self.features = FeatureStages(backbone, pretrained=pretrained, weights=weights)
        self.transformer = ReconstructionTransformer(
            sum(self.features.out_channels), (feature_size, feature_size), hidden_dim, num_heads, feedforward_dim,
            encoder_layers, decoder_layers, neighbourhood, dropout, masked=neighbour_masking)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """B x (h w) x C: the backbone's stages resized to the token grid and concatenated."""
        size = (self._config["feature_size"],) * 2
        with torch.no_grad():
            stages = self.features(images)
        resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in stages]
        return torch.cat(resized, dim=1).flatten(2).transpose(1, 2)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        target = self.tokens(batch.image)
        inputs = jitter(target, self._config["jitter_scale"], self._config["jitter_probability"]) \
            if self.training else target
        return {"loss": F.mse_loss(self.transformer(inputs), target)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.tokens(images)
        error = (self.transformer(tokens) - tokens).norm(dim=-1)  # B x P
        side = self._config["feature_size"]
        error = error.view(-1, 1, side, side)
        anomaly_map = F.interpolate(error, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = gaussian_blur(anomaly_map.squeeze(1), self._config["blur_sigma"])
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}
