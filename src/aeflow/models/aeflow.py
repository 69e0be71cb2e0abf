"""AE-FLOW (Zhao, Ding, Zhang, ICLR 2023): an autoencoder whose bottleneck is a normalizing flow.

Read top to bottom like the paper's method section:

1. Encoder: an ImageNet backbone cut at stride 16 maps the image x to features z (C x H/16 x W/16).
2. Flow: K invertible steps map z to z', trained so that z' of normal images is standard normal.
3. Decoder: four 2x2 stride-2 transposed convolutions reconstruct x' from z'.
4. Loss: alpha * L_flow + (1 - alpha) * L_recon, trained on normal images only.
5. Score: S = beta * S_flow + (1 - beta) * S_recon; pixel map from the reconstruction residual.

aeflow's default departs at step 5 (and feeds the flow from two encoder stages): the flow term of the score is the
distance of each position's z' to the nearest z' of the normal training images (a memory bank, as PatchCore keeps
one of features), not the likelihood under the flow's own N(0, I) prior, and the map is the same quantity per
position (see `reference` in the class docstring).

Where this file departs from the paper, it says so and why (see the class docstring); `paper` and
`paper_chest_xray` (aeflow.training.presets) switch every departure off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.base import MIN_VALIDATION_PER_CLASS, AnomalyModel, ScoreCollection, register
from aeflow.models.patchcore import greedy_coreset, nearest_neighbours
from aeflow.nn.backbones import create_backbone
from aeflow.nn.blocks import (
    PositionGaussians,
    adopt_buffer_shapes,
    gaussian_blur,
    mahalanobis_squared,
    stage_modules,
    stage_outputs,
)
from aeflow.nn.flow import INPUT_NORMS, SUBNETS, FlowBottleneck, bits_per_dim, standard_normal_log_prob

SCORE_MODES = ("paper", "standardized", "validated")
MAP_MODES = ("residual", "flow", "fused", "position")
DECODERS = ("transposed", "upsample")
REFERENCES = ("none", "position", "memory")
# Order of the per-component calibration buffers; a reference adds score_position and, with several stages, one
# score_position_s<stride> per stage (`AEFlow.components`).
SCORE_COMPONENTS = ("score_flow", "score_recon", "score_flow_nll", "score_flow_max")
# The flow components the validated blend weighs besides the reference's (score_flow ranks like -mean log N(z'),
# which the full NLL supersedes: it is kept for the paper's blend and for comparison).
BLENDED = ("score_flow_nll", "score_flow_max", "score_recon")
# The per-position Gaussians of the reference: covariance + REFERENCE_EPSILON * I (PaDiM's 0.01; z' has unit scale).
REFERENCE_EPSILON = 0.01
# The memory reference's coreset: greedy k-center selection after a random projection to this many dimensions where a
# stage keeps more channels (PatchCore's Johnson-Lindenstrauss projection), from a fixed seed.
MEMORY_PROJECTION = 128
BLEND_GRID_STEP = 0.05
# Smallest std a component is z-scored with, relative to its mean magnitude: variation below 0.1% of the value
# counts as none (float32 rounding through a deep network reaches 1e-6..1e-5 relative).
RELATIVE_STD_FLOOR = 1e-3


class Decoder(nn.Sequential):
    """z' (C x h x w) -> x' (image channels x 16h x 16w).

    Four 2x2 stride-2 transposed convolutions, C -> widths[0] -> widths[1] -> widths[2] -> image channels; each
    of the first three is followed by 3x3 conv + BatchNorm + ReLU. The paper's widths are 512/256/64 (for its
    1024-channel encoder); AEFlow's default is 128/64/32 (see `decoder_widths` there). A sigmoid ends it because
    images live in [0, 1].

    `upsample=True` (departure) replaces each transposed convolution by nearest-neighbour up-sampling and a 3x3
    convolution: a 2x2 stride-2 transposed convolution paints every output pixel from one input pixel with one
    of four kernels, which shows as a 2x2 checkerboard in the reconstruction and so in the residual map
    (Odena et al., "Deconvolution and checkerboard artifacts", 2016).
    """

    def __init__(self, feature_channels: int, image_channels: int, widths: tuple[int, int, int] = (128, 64, 32),
                 upsample: bool = False):
        def grow(cin: int, cout: int) -> list[nn.Module]:
            if upsample:
                return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)]
            return [nn.ConvTranspose2d(cin, cout, 2, stride=2)]

        layers: list[nn.Module] = []
        channels = feature_channels
        for width in widths:
            layers += [*grow(channels, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers += [*grow(channels, image_channels), nn.Sigmoid()]
        super().__init__(*layers)


class CalibrationSet(ScoreCollection):
    """A ScoreCollection plus what the "fused" map needs from the normal validation images: both pixel maps' sums
    (`AEFlow.fit_calibration`)."""

    def __init__(self):
        super().__init__()
        self.map_sums = torch.zeros(2, 3, dtype=torch.float64)  # per map: count, sum, sum of squares

    def add(self, parts: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        super().add(parts, labels)
        normal = labels.detach().cpu() <= 0
        for i, key in enumerate(("map_residual", "map_flow")):
            values = parts[key].detach()[normal.to(parts[key].device)].double().cpu()
            self.map_sums[i] += torch.stack([torch.tensor(values.numel()), values.sum(), values.pow(2).sum()])


@register("aeflow")
class AEFlow(AnomalyModel):
    """AE-FLOW for images of any side that is a multiple of 16 (tested 64 to 512).

    Departures from the paper, each an option (the `paper*` presets switch them all off), measured in
    docs/aeflow.md and docs/results/ablation_*.md:

    - `freeze_encoder`: the paper does not say whether its encoder is trained; both are supported. Frozen is
      the default because a trained encoder can shrink its features to raise the flow's likelihood (its own
      Jacobian is not in the loss): measured on PneumoniaMNIST, test AUROC 0.23 trained vs 0.71 frozen.
    - `feature_norm`: how the encoder's features are brought to unit scale before the flow
      (aeflow.nn.flow.FlowBottleneck). "image" (default) standardises each image's map over (C, h, w), as
      FastFlow does, so the flow models the features' structure, not the image's overall feature scale (which
      follows its contrast); the likelihood is then that of the normalised map. "channel" standardises per
      channel with fixed training statistics and keeps the likelihood of z itself.
    - `stages`: the encoder strides whose features each get a flow, [16] in the paper. [8, 16] (default) adds a
      flow on the stride-8 stage, so that a 64-px image is not seen only as a 4 x 4 map; the decoder still decodes
      the stride-16 z', the flow loss and the flow scores average the stages, the reference sums them.
    - `reference` (default "memory"; "none" in the paper): the flow term of the score measured against the z' of
      NORMAL TRAINING images rather than the flow's own prior. Why: N(0, I) is the same at every position and for
      every image, so log N(z') measures how Gaussian z' is, not how far it is from what normal images give; on
      both boards the flow NLL told anomalies apart less well than the distance of a test z' to the normal z'.
      Two references, each giving a distance d_sp per stage s and position p:
      "memory" (default): PatchCore's nearest neighbour in the flow's latent space. Every position's z' of the
      normal training images goes into one bank per stage, whatever its position, and d_sp = |z'_sp - m|, the
      Euclidean distance to the nearest bank vector m. A normal pattern seen anywhere counts as normal
      everywhere, so the images need no fixed layout, and any image size can be scored. `memory_ratio` (default
      0.1, PatchCore's 10 %) keeps a greedy k-center coreset of that fraction of each bank (after a random
      projection to 128 dimensions where a stage keeps more channels), which bounds the bank and the search.
      "position": per-position Gaussians N(mu_sp, Sigma_sp), full covariance + 0.01 I (PaDiM's model in the
      latent space), d_sp = 0.5 (z'_sp - mu_sp)^T Sigma_sp^-1 (z'_sp - mu_sp), the NLL of z' up to constants.
      It uses where things are (a border that is always bright is normal there only), holds P x d x d
      precisions per stage, and fixes the positions: images are scored at the training size.
      Measured at the boards' 4 epochs (3 seeds, docs/aeflow.md): the memory ranks images better on both boards
      (magnetic tile 0.954 -> 0.984, PneumoniaMNIST 0.901 -> 0.918), the Gaussians' map is better at pixel
      level on the tiles (0.817 against 0.791), whose layout is fixed.
      Either reference adds `score_position` = the sum over stages of the mean over positions of d_sp (and, with
      several stages, `score_position_s<stride>` each stage's term) and the "position" map (d_sp up-sampled,
      summed over the stages, smoothed). The flow is what makes it work: the same Gaussians on the raw encoder
      features ranked worse on both boards (docs/aeflow.md). The reference comes from a pass over the normal
      training images with the weights in use (`fit_reference`), which aeflow.training runs before every
      validation pass, so that each epoch's validation AUROC is that of the score the run would keep (at the cost
      of one more forward pass of encoder and flows per epoch). At most `reference_channels` channels of each
      stage enter it (a fixed random subset, as PaDiM does, where a stage has more).
    - `decoder`: "transposed" (paper) or "upsample" (no checkerboard artefacts, see `Decoder`).
    - `decoder_widths`: 128/64/32 (default), narrower than the paper's 512/256/64 (the `paper*` presets): 0.067
      against 0.79 GFLOP per 64-px image behind EfficientNet-Lite0 (docs/results/ablation_decoder.md). Measured at the boards' set-up (EfficientNet-Lite0, conv coupling, 4 epochs, 3
      seeds, one change at a time, `benchmarks/aeflow_ablation.py --rows 8`, docs/results/ablation_decoder.md):
      the paper's widths rank images no better (magnetic tile 0.985 +- 0.007 against 0.984 +- 0.007,
      PneumoniaMNIST 0.916 +- 0.010 against 0.918 +- 0.006, validation 0.978 both) and the tiles' pixel AUROC
      is lower with them (0.778 +- 0.006 against 0.790 +- 0.001): the cost buys nothing there.
    - Score components, all reported on their own: the paper's `score_flow` = -exp(mean log N(z')); the full
      negative log-likelihood of the flow's input per dimension, `score_flow_nll` = -(log N(z') + log|det|) / D,
      which `score_flow` leaves out the log-determinant of; `score_flow_max`, the largest value of the smoothed
      per-position flow map (for small, local anomalies that a mean over positions dilutes); and the paper's
      `score_recon` = -SSIM(x, x').
    - `score_mode`: "paper" blends the raw S_flow and S_recon with beta. The raw blend is ruled by whichever term
      happens to vary more, not by beta (S_flow spreads over a few 1e-3, -SSIM over tenths), so the other modes
      first z-score each component with the mean and std of NORMAL validation images (`calibrate`).
      "standardized" then blends beta * z(score_flow_nll) + (1 - beta) * z(score_recon). "validated" (default)
      fits the weights of the reference's per-stage terms z(score_position_s<stride>) (or z(score_position) with
      one stage), z(score_flow_nll), z(score_flow_max) and z(score_recon) (non-negative, summing to 1, a grid of
      step 0.05) to the validation AUROC when the validation split holds labelled anomalies (at least 20 of each
      class), and uses them only if they beat the label-free blend below by more than the standard error of the
      validation AUROC (the best of ~10^4 grid points on a small split is partly luck). Without such labels the
      paper's beta splits the score between the latent term and the reconstruction: beta * z(score_position) + (1 - beta) * z(score_recon)
      with a reference; without one (nothing can then say whether anomalies will be diffuse, which a mean over
      positions sees, or local, which a maximum does) beta is split equally between z(score_flow_nll) and
      z(score_flow_max). The weights are buffers: they travel with the run, and `blend_weight` says what was
      chosen.
    - `map_mode`: "residual" (paper: smoothed |x - x'|), "flow" (up-sampled per-position NLL of z', averaged over
      the stages), "fused" (mean of both after z-scoring each with the calibration statistics) or "position"
      (default, needs the reference): each position's z' against the reference, 0.5 (z'_sp - mu_sp)^T
      Sigma_sp^-1 (z'_sp - mu_sp), up-sampled, summed over the stages and smoothed. The flow is convolutional
      and its prior the same at every position, so its own map cannot tell a position where normal images always
      look unusual (a border, an organ's outline in aligned scans) from a lesion; the per-position reference can.
      Measured on the magnetic tile (64 px, 8 epochs, 3 seeds): pixel AUROC 0.632 +- 0.011 with the residual
      map, 0.750 +- 0.018 with a diagonal reference of the stride-16 z' from validation images
      (docs/results/ablation_magnetic_tile_position.md), 0.801 +- 0.006 with the full reference on both stages
      (docs/results/ablation_magnetic_tile_reference.md).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        weights: str | None = None,
        freeze_encoder: bool = True,
        in_channels: int = 1,
        flow_steps: int = 8,
        subnet: str = "resnet",
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        decoder_widths: tuple[int, int, int] | list[int] = (128, 64, 32),
        alpha: float = 0.5,
        beta: float = 0.9,
        score_mode: str = "validated",
        map_mode: str = "position",
        feature_norm: str = "image",
        stages: tuple[int, ...] | list[int] = (8, 16),
        decoder: str = "transposed",
        reference: str = "memory",
        reference_channels: int = 128,
        memory_ratio: float = 0.1,
    ):
        super().__init__()
        for name, value, choices in (("subnet", subnet, SUBNETS), ("score_mode", score_mode, SCORE_MODES),
                                     ("map_mode", map_mode, MAP_MODES), ("feature_norm", feature_norm, INPUT_NORMS),
                                     ("decoder", decoder, DECODERS), ("reference", reference, REFERENCES)):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        if in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if len(decoder_widths) != 3:
            raise ConfigError(f"decoder_widths needs three widths, got {list(decoder_widths)}")
        stages = tuple(stages)
        if not stages or stages[-1] != 16 or list(stages) != sorted(set(stages)):
            raise ConfigError(f"stages must be increasing strides ending with 16 (the decoded stage), got {list(stages)}")
        if map_mode == "position" and reference == "none":
            raise ConfigError("map_mode='position' is the reference's map: it needs reference='position' or 'memory'")
        if reference_channels < 1:
            raise ConfigError(f"reference_channels must be >= 1, got {reference_channels}")
        if not 0.0 < memory_ratio <= 1.0:
            raise ConfigError(f"memory_ratio must lie in (0, 1], got {memory_ratio}")
        self.alpha, self.beta = alpha, beta
        self.score_mode, self.map_mode = score_mode, map_mode
        self.reference, self.memory_ratio = reference, float(memory_ratio)
        self.n_stages = len(stages) if reference != "none" else 0  # stages with a reference
        # The reference's components: its whole likelihood and, with several stages, each stage's part of it, which
        # the validated blend weighs separately (diffuse changes may show at one stride, small defects at another).
        self.stage_components = tuple(f"score_position_s{s}" for s in stages) if self.n_stages > 1 else ()
        reference_parts = ("score_position", *self.stage_components) if self.n_stages else ()
        self.components = (*SCORE_COMPONENTS, *reference_parts)
        self.blended = (*(self.stage_components or reference_parts), *BLENDED)

        self.encoder = create_backbone(backbone, pretrained=pretrained, weights=weights, frozen=freeze_encoder)
        self.stage_names = stage_modules(backbone, stages) if len(stages) > 1 else ()
        channels = self.encoder.out_channels
        self.flow = FlowBottleneck(channels, flow_steps, subnet, hidden_ratio, clamp, input_norm=feature_norm)
        # Flows of the earlier stages (none in the paper), in the order of `stages`.
        side_channels = _stage_channels(self.encoder, self.stage_names)[:-1]
        self.side_flows = nn.ModuleList(
            FlowBottleneck(c, flow_steps, subnet, hidden_ratio, clamp, input_norm=feature_norm) for c in side_channels
        )
        self.decoder = Decoder(channels, in_channels, tuple(decoder_widths), upsample=decoder == "upsample")

        # Statistics of normal validation images and the blend weights (see `calibrate`); buffers, so they travel
        # with the weights.
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("score_mean", torch.zeros(len(self.components)))
        self.register_buffer("score_std", torch.ones(len(self.components)))
        self.register_buffer("blend_weight", self._fixed_blend())
        self.register_buffer("map_mean", torch.zeros(2))  # residual map, flow map
        self.register_buffer("map_std", torch.ones(2))
        # The reference (see `fit_reference`): per stage, the channels it keeps and either its P x d means and
        # P x d x d precisions ("position") or its N x d bank of normal z' ("memory"), sized by the first fit (empty
        # until then).
        generator = torch.Generator().manual_seed(0)
        for i, c in enumerate([*side_channels, channels][: self.n_stages]):
            kept = torch.randperm(c, generator=generator)[:reference_channels].sort().values
            self.register_buffer(f"reference_index{i}", kept)
            for name in self._reference_buffers(i):
                self.register_buffer(name, torch.empty(0))

    # 1-3. Encoder, flow, decoder --------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features per stage, the stride-16 one last."""
        if not self.stage_names:
            return [self.encoder(x)]
        return stage_outputs(self.encoder, self.stage_names, x)

    def flow_and_reconstruction(self, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """x -> ([(z', log|det dz'/dz|) per stage, stride 16 last], reconstruction x' from the stride-16 z')."""
        if x.ndim != 4 or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ConfigError(f"AE-FLOW needs B x C x H x W images with H and W multiples of 16, got {tuple(x.shape)}")
        latents = self.flow_latents(x)
        return latents, self.decoder(latents[-1][0])

    def flow_latents(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """x -> [(z', log|det dz'/dz|) per stage, stride 16 last], without the decoder."""
        return [flow(z) for flow, z in zip([*self.side_flows, self.flow], self._encode(x))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (z', log|det dz'/dz| per sample, reconstruction x') of the stride-16 stage."""
        latents, x_rec = self.flow_and_reconstruction(x)
        return latents[-1][0], latents[-1][1], x_rec

    # 4. Loss -------------------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L = alpha * L_flow + (1 - alpha) * MSE(x, x').

        L_flow is the flow's negative log-likelihood in bits per latent dimension:
        (-log N(z'; 0, I) - log|det|) / (C * h * w * ln 2), averaged over the stages. Unscaled, the sum over
        ~260k dimensions would swamp the MSE term; bits/dim is the scaling the guide's measurements used.
        """
        x = batch.image
        latents, x_rec = self.flow_and_reconstruction(x)
        loss_flow = torch.stack([_bits_per_dim(z_prime, log_det) for z_prime, log_det in latents]).mean(0).mean()
        loss_recon = F.mse_loss(x_rec.float(), x.float())
        loss = self.alpha * loss_flow + (1 - self.alpha) * loss_recon
        return {"loss": loss, "loss_flow": loss_flow, "loss_recon": loss_recon}

    # 5. Scores (a): the reference of the normal training images' z', a memory bank or per-position Gaussians

    def _reference_buffers(self, i: int) -> tuple[str, ...]:
        """The fitted buffers of stage i's reference (empty until `fit_reference`)."""
        if self.reference == "memory":
            return (f"reference_bank{i}",)
        return (f"reference_mean{i}", f"reference_precision{i}")

    @property
    def reference_fitted(self) -> bool:
        return self.n_stages > 0 and getattr(self, self._reference_buffers(0)[0]).numel() > 0

    @torch.no_grad()
    def fit_reference(self, images: Iterable[Batch | torch.Tensor], *, all_reduce: bool = False) -> None:
        """Fit the reference on NORMAL TRAINING images (Batches: only label <= 0 count; tensors: all), in one pass
        with the weights as they are. aeflow.training calls it before every validation pass, so that each epoch's
        validation AUROC (and the kept checkpoint, which holds the reference) is that of the score the epoch's
        weights are used with. all_reduce: sum the statistics over the processes of a DDP run (each passing its
        shard of the training images)."""
        if not self.n_stages:
            return
        memory = self.reference == "memory"
        sums = [_MemoryBank() if memory else PositionGaussians() for _ in range(self.n_stages)]
        device = self.score_mean.device
        was_training = self.training
        self.eval()
        for item in images:
            batch_images = item.image if isinstance(item, Batch) else item
            if isinstance(item, Batch):
                batch_images = batch_images[item.label <= 0]
            if len(batch_images):
                for i, (z_prime, _) in enumerate(self.flow_latents(batch_images.to(device).float())):
                    sums[i].add(z_prime.float()[:, getattr(self, f"reference_index{i}")])
        self.train(was_training)
        if all_reduce:
            for stage in sums:
                stage.all_reduce()
        if sums[0].count < 2:
            raise ConfigError(f"fit_reference() needs at least two normal images, got {sums[0].count}")
        if memory:
            for i, stage in enumerate(sums):
                setattr(self, f"reference_bank{i}", stage.bank(self.memory_ratio).to(device))
        else:
            self._set_reference(sums)

    def _set_reference(self, sums: list[PositionGaussians]) -> None:
        device = self.score_mean.device
        for i, stage in enumerate(sums):
            mean, precision = stage.gaussians(REFERENCE_EPSILON)
            setattr(self, f"reference_mean{i}", mean.to(device))
            setattr(self, f"reference_precision{i}", precision.to(device))

    def _reference_distances(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage (B x h x w each): "position", 0.5 (z'_sp - mu_sp)^T Sigma_sp^-1 (z'_sp - mu_sp); "memory",
        |z'_sp - m|, the Euclidean distance to the nearest bank vector m of any position."""
        if self.reference == "memory":
            distances = []
            for i, z_prime in enumerate(latents[: self.n_stages]):
                z = z_prime.float()[:, getattr(self, f"reference_index{i}")]
                _, d, h, w = z.shape
                nearest = nearest_neighbours(z.permute(0, 2, 3, 1).reshape(-1, d), getattr(self, f"reference_bank{i}"))
                distances.append(nearest[0].view(-1, h, w))
            return distances
        distances = []
        for i, z_prime in enumerate(latents[: self.n_stages]):
            mean = getattr(self, f"reference_mean{i}")
            if z_prime.shape[-2] * z_prime.shape[-1] != mean.shape[0]:
                side = round(mean.shape[0] ** 0.5)
                raise ConfigError(
                    f"the reference holds a Gaussian for each of the {mean.shape[0]} positions of the training "
                    f"images' latent map, but these images give {z_prime.shape[-2]} x {z_prime.shape[-1]}: score "
                    f"images of the training size (e.g. {side * 16} x {side * 16} px for a square one)")
            z = z_prime.float()[:, getattr(self, f"reference_index{i}")]
            distances.append(0.5 * mahalanobis_squared(z, mean, getattr(self, f"reference_precision{i}")))
        return distances

    # 5. Scores (b): components, blend, maps ------------------------------------------------------------

    @torch.no_grad()
    def score_components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each score component on its own (B,), higher = more anomalous, plus the two raw pixel maps.

        score_flow: the paper's -exp(mean over dimensions of log N(z'; 0, I)), stride-16 stage.
        score_flow_nll: the flow's negative log-likelihood per dimension, -(log N(z') + log|det dz'/dz|) / D, in
            nats, averaged over the stages.
        score_flow_max: the maximum over pixels of map_flow.
        score_recon: the paper's -SSIM(x, x').
        score_position (with a reference): the sum over stages of the mean over positions of the reference
            distance (`_reference_distances`), and score_position_s<stride> each stage's term (with several
            stages); zero until the reference is fitted.
        map_residual / map_flow (B x H x W): smoothed |x - x'| averaged over channels / the per-position NLL of
            z' (mean over channels of -log N), up-sampled to the image, smoothed and averaged over the stages.
        map_position (with a reference): the reference distances up-sampled, summed over the stages, smoothed.
        reconstruction: x' itself, for the report's gallery.
        """
        x = images.float()
        latents, x_rec = self.flow_and_reconstruction(x)
        sigma = 4.0 * x.shape[-1] / 256  # 4 px at 256 px, as PaDiM and PatchCore smooth their maps
        nll, flow_maps = [], []
        for z_prime, log_det in latents:
            log_p = standard_normal_log_prob(z_prime.float())  # B x C x h x w
            nll.append(-(log_p.flatten(1).sum(1) + log_det.float()) / z_prime[0].numel())
            position = F.interpolate(-log_p.mean(1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)
            flow_maps.append(gaussian_blur(position[:, 0], sigma))
        map_flow = torch.stack(flow_maps).mean(0)
        deepest_log_p = standard_normal_log_prob(latents[-1][0].float()).flatten(1).mean(1)
        parts = {
            "score_flow": -torch.exp(deepest_log_p),
            "score_recon": -ssim(x, x_rec.float(), data_range=1.0, size_average=False, win_size=_ssim_window(x)),
            "score_flow_nll": torch.stack(nll).mean(0),
            "score_flow_max": map_flow.flatten(1).amax(1),
            "map_residual": gaussian_blur((x - x_rec).abs().mean(1), sigma),
            "map_flow": map_flow,
            "reconstruction": x_rec,
        }
        if self.n_stages:
            if self.reference_fitted:
                distances = self._reference_distances([z for z, _ in latents])
                per_stage = [d.flatten(1).mean(1) for d in distances]
                parts["score_position"] = sum(per_stage)
                parts.update(zip(self.stage_components, per_stage))
                up = [F.interpolate(d[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                      for d in distances]
                parts["map_position"] = gaussian_blur(sum(up), sigma)
            else:
                parts.update({name: x.new_zeros(len(x)) for name in ("score_position", *self.stage_components)})
                parts["map_position"] = x.new_zeros(len(x), *x.shape[-2:])
        return parts

    def blend(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image score from the components (`score_mode`); needs `calibrate` except in "paper" mode."""
        if self.score_mode == "paper":
            return self.beta * parts["score_flow"] + (1 - self.beta) * parts["score_recon"]
        return sum(self.blend_weight[i] * (parts[name] - self.score_mean[i]) / self.score_std[i]
                   for i, name in enumerate(self.components))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.score_components(images)
        if self.n_stages and not self.reference_fitted:
            raise ConfigError(f"reference={self.reference!r} needs the z' of normal training images: call "
                              "fit_reference() with them, then calibrate() (training does both for you)")
        needs_calibration = self.score_mode != "paper" or self.map_mode == "fused"
        if needs_calibration and not bool(self.calibrated):
            raise ConfigError(
                f"score_mode={self.score_mode!r} / map_mode={self.map_mode!r} need statistics of normal images: "
                "call calibrate() with normal validation images first (training does this for you)"
            )
        score = self.blend(parts)
        residual, flow, position = parts.pop("map_residual"), parts.pop("map_flow"), parts.pop("map_position", None)
        if self.map_mode == "residual":
            anomaly_map = residual
        elif self.map_mode == "flow":
            anomaly_map = flow
        elif self.map_mode == "position":
            anomaly_map = position
        else:
            z_residual = (residual - self.map_mean[0]) / self.map_std[0]
            z_flow = (flow - self.map_mean[1]) / self.map_std[1]
            anomaly_map = 0.5 * (z_residual + z_flow)
        return {"pred_score": score, "anomaly_map": anomaly_map, **parts}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix, [name for i in range(self.n_stages)
                                                       for name in self._reference_buffers(i)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def calibration_set() -> CalibrationSet:
        """An empty collection for `fit_calibration`, to fill with `score_components` outputs and labels."""
        return CalibrationSet()

    @torch.no_grad()
    def calibrate(self, images: Iterable[Batch | torch.Tensor]) -> None:
        """Fit the calibration on validation images (never test ones): see `fit_calibration`.

        `images` yields Batches (their labels say which are normal; anomalous ones, label 1, only shape the
        "validated" blend weights) or image tensors, all taken as normal. With a reference, fit it first
        (`fit_reference`, on training images).
        """
        device = self.score_mean.device
        collected = self.calibration_set()
        was_training = self.training
        self.eval()
        for item in images:
            batch_images = item.image if isinstance(item, Batch) else item
            labels = item.label if isinstance(item, Batch) else torch.zeros(len(item), dtype=torch.long)
            if len(batch_images):
                collected.add(self.score_components(batch_images.to(device)), labels)
        self.train(was_training)
        self.fit_calibration(collected)

    @torch.no_grad()
    def fit_calibration(self, collected: CalibrationSet) -> None:
        """Mean and std of each score component and of both pixel maps over the NORMAL images of `collected`,
        and the blend weights: fitted to the validation AUROC in "validated" mode when `collected` holds at least
        MIN_VALIDATION_PER_CLASS images of each class (aeflow.models.base), `_fixed_blend` otherwise."""
        labels = collected.label_tensor()
        normal = labels <= 0
        if int(normal.sum()) < 2:
            raise ConfigError("calibrate() needs at least two normal images")
        standardized = {}
        for i, name in enumerate(self.components):
            values = collected.component(name)
            self.score_mean[i] = values[normal].mean()
            # A component that does not vary over normal images beyond float32 precision (e.g. the NLL of an
            # untrained flow on per-image normalised features, which is the same for every image) would otherwise
            # be blown up from rounding noise into a large z-score.
            self.score_std[i] = values[normal].std().clamp_min(RELATIVE_STD_FLOOR * float(values[normal].abs().mean()) + 1e-12)
            standardized[name] = (values - self.score_mean[i].double()) / self.score_std[i].double()
        count, total, total_sq = collected.map_sums.unbind(1)
        mean = total / count
        self.map_mean.copy_(mean)
        self.map_std.copy_((total_sq / count - mean.pow(2)).clamp_min(1e-24).sqrt())
        self.blend_weight.copy_(self._fixed_blend())
        if self.score_mode == "validated" and min(int(normal.sum()), int((labels == 1).sum())) >= MIN_VALIDATION_PER_CLASS:
            self.blend_weight.copy_(_best_blend(standardized, labels == 1, self.blend_weight, self.components,
                                                self.blended))
        self.calibrated.fill_(True)

    def _fixed_blend(self) -> torch.Tensor:
        """The blend when no labels choose one: "standardized", beta on z(score_flow_nll); "validated", beta on
        z(score_position) with a reference, else split equally between z(score_flow_nll) and z(score_flow_max);
        1 - beta on z(score_recon)."""
        weight = torch.zeros(len(self.components))
        index = self.components.index
        if self.score_mode == "validated" and self.n_stages:
            weight[index("score_position")] = self.beta
        elif self.score_mode == "validated":
            weight[index("score_flow_nll")] = self.beta / 2
            weight[index("score_flow_max")] = self.beta / 2
        else:
            weight[index("score_flow_nll")] = self.beta
        weight[index("score_recon")] = 1 - self.beta
        return weight

    def blend_weights(self) -> dict[str, float]:
        """The weight of each standardized component in the image score (after calibration: what was chosen)."""
        return {name: float(w) for name, w in zip(self.components, self.blend_weight)}


class _MemoryBank:
    """The memory reference's collection for one stage: every position's z' (d channels) of the normal training
    images in one N x d bank, whatever the position; `bank` keeps a greedy coreset of it (PatchCore's)."""

    def __init__(self):
        self.count, self.parts = 0, []

    def add(self, x: torch.Tensor) -> None:
        """x: B x d x h x w."""
        self.parts.append(x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float().cpu())
        self.count += len(x)

    def all_reduce(self) -> None:
        """Gather every process's vectors (each rank passes its shard of the training images); nothing without a
        torch.distributed group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (self.count, self.parts))
        self.count = sum(count for count, _ in shards)
        self.parts = [part for _, parts in shards for part in parts]

    def bank(self, ratio: float) -> torch.Tensor:
        bank = torch.cat(self.parts)
        if ratio >= 1.0:
            return bank
        size = max(1, round(ratio * len(bank)))
        projection = MEMORY_PROJECTION if bank.shape[1] > MEMORY_PROJECTION else None
        return bank[greedy_coreset(bank, size, projection, torch.Generator().manual_seed(0))]


@torch.no_grad()
def _stage_channels(encoder: nn.Module, names: tuple[str, ...]) -> list[int]:
    """Channel counts of the named encoder stages, from one small forward pass in eval mode."""
    if not names:
        return [encoder.out_channels]
    was_training = encoder.training
    encoder.eval()
    channels = [f.shape[1] for f in stage_outputs(encoder, names, torch.zeros(1, 3, 32, 32))]
    encoder.train(was_training)
    return channels


def _bits_per_dim(z_prime: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    log_pz = standard_normal_log_prob(z_prime.float()).flatten(1).sum(1)
    return bits_per_dim(log_pz, log_det.float(), z_prime[0].numel())


def _best_blend(standardized: dict[str, torch.Tensor], anomalous: torch.Tensor, start: torch.Tensor,
                components: tuple[str, ...], blended: tuple[str, ...]) -> torch.Tensor:
    """Non-negative weights summing to 1 over the `blended` components (grid step BLEND_GRID_STEP) whose blend has
    the highest AUROC on these (validation) images; `start` (weights over `components`, the label-free blend) is
    kept unless that AUROC beats start's by more than one standard error."""
    columns = torch.stack([standardized[name] for name in blended], 1)  # N x len(blended)
    index = [components.index(name) for name in blended]
    every = torch.stack([standardized[name] for name in components], 1)
    best = float(_aurocs(every @ start.double()[:, None], anomalous)[0])
    best_weight = start.clone()
    grid = torch.tensor(list(_compositions(len(blended), round(1 / BLEND_GRID_STEP))), dtype=torch.float64)
    grid /= round(1 / BLEND_GRID_STEP)
    aurocs = torch.cat([_aurocs(columns @ chunk.T, anomalous) for chunk in grid.split(2048)])
    i = int(aurocs.argmax())  # the first grid point of the highest AUROC
    # One standard error: with hundreds of grid points, the best of them on a small validation split is partly
    # luck; the fitted blend replaces `start` only when it beats it by more than the standard error of an AUROC
    # at these class sizes.
    if float(aurocs[i]) > best + _auroc_standard_error(best, int(anomalous.sum()), int((~anomalous).sum())):
        best_weight = torch.zeros_like(start)
        best_weight[index] = grid[i].float()
    return best_weight


def _auroc_standard_error(auroc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUROC with n_pos anomalous and n_neg normal images (Hanley and McNeil, 1982)."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (n_pos - 1) * (q1 - auroc**2) + (n_neg - 1) * (q2 - auroc**2)) / (n_pos * n_neg)
    return max(variance, 0.0) ** 0.5


def _aurocs(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The AUROC of every column of `scores` (N x M) for the labels `positive` (N, bool), ties counted half
    (the Mann-Whitney U statistic over average ranks, as sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = torch.from_numpy(rankdata(scores.numpy(), axis=0))
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _compositions(n: int, total: int) -> Iterator[tuple[int, ...]]:
    if n == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(n - 1, total - first):
            yield (first, *rest)


def _ssim_window(images: torch.Tensor) -> int:
    """SSIM's usual 11-pixel window, or the largest odd window that fits a smaller image."""
    side = min(images.shape[-2:])
    return min(11, side if side % 2 else side - 1)

