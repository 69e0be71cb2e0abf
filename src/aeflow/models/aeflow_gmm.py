"""Semi-supervised AE-FLOW: the flow latent gets a Gaussian-mixture prior (FlowGMM, Izmailov et al. 2020).

Hospitals usually hold a few confirmed abnormal cases; plain AE-FLOW ignores them. Here the flow's latent z'
(C x h x w) has two components, "normal" and "anomalous", and each image trains on the likelihood of its label:

- normal (label 0): N(z'; 0, I), exactly AE-FLOW's prior, so with no labelled anomaly the loss, the weights
  and the scores are AE-FLOW's (the K = 0 reduction, tested);
- anomalous (label 1) of type t: each spatial position's C-vector z'_p is drawn from the per-position mixture
  (1 - rho_t) N(0, I_C) + rho_t N(mu_t, diag(var_t)): an abnormal image is a normal one in which a fraction rho_t
  of the positions show the abnormality (a lesion covers a few positions, pneumonia many). One such component
  per anomaly type when the labelled images name their types (`anomaly_types`; training fills it from the
  labelled images: the magnetic tile's blowhole, break, crack, fray, uneven), else one; p(z' | anomalous) is the
  mean of the types' likelihoods (equal type priors), and p(t | z', anomalous) is in the outputs;
- unlabelled (label -1, e.g. a contaminated training pool): the image-level mixture
  pi0 p(z' | normal) + pi1 p(z' | anomalous), pi1 = `unlabelled_anomaly_prior`. (aeflow's layouts label
  their training images normal, so this case is there for data that say -1.)

The flow loss is AE-FLOW's bits per dimension, -(log p(z' | label) + log|det|) / (D ln 2), on the deepest
(stride-16, decoded) stage. With several `stages` (AE-FLOW's default: strides 8 and 16) the earlier stages' flows
keep AE-FLOW's N(0, I) loss on the images not labelled anomalous, and so does the reconstruction loss: the decoder,
the side flows and AE-FLOW's per-position reference (fitted on normal training images only) still learn what
normal looks like, and AE-FLOW's own score stays an unsupervised one to blend with the posterior.

Choices, and why (numbers: docs/semi_supervised.md):
- Means: the normal component is fixed at N(0, I). The anomalous mu, its per-channel variance and rho are
  estimated by EM, not by gradient: each training batch with labelled anomalies takes one EM step on their
  positions (responsibilities, then weighted mean / variance / mean responsibility), averaged in with
  `em_momentum`. Why: Adam moves a parameter by about lr per step, so a learned mu needs thousands of steps to
  reach the few-units distance that separates the components; in a first version mu had norm 0.6 after 56
  steps and the posterior ranked worse than the flow NLL. The flow itself is still trained by gradient on the
  mixture likelihood, so it learns to move labelled abnormal positions into the anomalous component.
- Start: var = `initial_var` (4) and rho = `initial_fraction` (0.1): the anomalous component starts as a broad
  "outlier" component, so the first EM steps give it the positions that N(0, I) explains badly. Starting both
  components equal (mu = 0, var = 1, rho = 0.5) let EM settle on a component that explained a third of all
  positions of anomalous images with var ~1.1, i.e. normal tissue: on 128-px phantoms (difficulty 0, seeds 0
  and 1) with 20 labelled lesions its posterior AUROC was 0.80 / 0.76, below the unsupervised model's
  0.83 / 0.86, against 0.94 / 0.94 with the broad start.
  The variance is kept >= 1: abnormal tissue varies at least as much as normal tissue.
- The very high latent dimension. A per-image Gaussian mixture over all D = C h w dimensions (1e4-2.6e5) has
  log-likelihood ratios that grow with D, so p(anomalous | z') is 0 or 1 for almost every image and ranks
  nothing. The per-position mixture has the image log-odds
      log p(anom | z') / p(normal | z') = log(pi1 / pi0) + sum_p log(1 - rho + rho N(z'_p; mu, var) / N(z'_p; 0, I))
  whose terms are bounded below by log(1 - rho) at normal-looking positions: it grows with the number of
  ABNORMAL positions, not with D (a soft OR over positions), and it gives a per-position posterior, a natural
  anomaly map (`map_posterior`). The probability can still round to 0 or 1 on large maps, so the score
  component is the log-odds itself, `score_posterior` (the logit of p(anomalous | z'): same ranking, no
  saturation). A temperature would not change the ranking, so there is none.
- Where the posterior's components live (`posterior_space`). The flow trains its z' towards N(0, I) for every
  normal image, but AE-FLOW's per-position reference (aeflow.models.aeflow) shows that the normal z'_p is far
  from N(0, I) at a given position p: it is N(mu_p, Sigma_p). So by default ("reference") the scored posterior
  uses the reference as the normal component: at each reference stage and position, w_p = L_p^T (z'_p - mu_p)
  with L_p L_p^T = Sigma_p^-1 (N(0, I) under the reference, and w_p . w_p its squared Mahalanobis distance),
  and the same per-position mixture as above in w, with components (mu_t, var_t, rho_t) per type and stage
  fitted by EM to convergence on the labelled anomalies' w (the reference pass before each validation sees
  them; the whitening's Jacobian is the same under both components and cancels in the odds). The stages' image
  log-odds add up; their maps are averaged. The latent posterior (components on the deepest z', trained with
  the flow) stays in the outputs as `score_posterior_latent`. Measured (docs/semi_supervised.md, same runs,
  3 seeds): on the magnetic tile the reference-space posterior ranks the test set at 0.961 / 0.967 with K = 5 /
  20 against 0.657 / 0.800 for the latent one; on PneumoniaMNIST 0.921 / 0.915 / 0.910 at K = 5 / 20 / 100
  against 0.878 / 0.933 / 0.924.
- An image-level component beside the per-position one (`image_component=True`, the default with the
  reference-space posterior): the per-position mixture is a soft OR over positions, strong when a few positions
  are abnormal; a diffuse change (pneumonia) shifts every position a little. So each image is also pooled into
  g = the mean and standard deviation over positions of each whitened channel, at every reference stage, and
  scored by linear discriminant analysis: N(g; m_t, S) per labelled type against N(g; m_normal, S), m_normal and S
  from up to IMAGE_NORMALS normal training images (Ledoit-Wolf shrinkage), m_t from the labelled images of type
  t; one shared covariance, because K labelled images cannot estimate their own. `score_posterior_image` is its
  log-odds; the posterior part of the image score weighs its and the per-position posterior's z-scores (next point).
  Measured (docs/semi_supervised.md, 3 seeds): on its own it ranks PneumoniaMNIST's test split at 0.898 / 0.948 /
  0.951 (K = 5 / 20 / 100), the tiles' at 0.959 / 0.975 (K = 5 / 20); with it the image score rose from 0.923 /
  0.920 / 0.916 to 0.928 / 0.932 / 0.930 on PneumoniaMNIST and from 0.964 / 0.964 to 0.968 / 0.971 on the tiles.
- Image score: gamma * z(posterior part) + (1 - gamma) * AE-FLOW's image score, z() standardising on normal
  validation images (`calibrate`) as AE-FLOW's blend does; with the image-level component the posterior part is
  (1 - a) z(per-position posterior) + a z(image-level posterior). gamma = "validated" (the default) chooses gamma
  and a together on the validation split when that holds labelled anomalies (at least MIN_VALIDATION_PER_CLASS of
  each class): the pair of the grid gamma in 0, 0.05, ..., 1 by a in 0, 0.25, ..., 1 with the highest validation
  AUROC, kept only when it beats the label-free pair (0.5, 0.5) by more than one standard error of that AUROC
  (AE-FLOW's rule for its own blend). Without labelled validation anomalies gamma = a = 0.5: standardised
  scores, one learnt from the labels and one from the normals, weighed equally, and so are the two posteriors.
  Why not a fixed gamma = 1 (posterior only, the first default): on PneumoniaMNIST's validation split it ranked
  best at K = 20 but worst at K = 5, where AE-FLOW's own score was best (docs/semi_supervised.md). On that split
  validation kept the label-free pair in 9 of 9 runs (K = 5 / 20 / 100, 3 seeds: every candidate ranks it at
  0.98). The chosen pair is in `blend_weights()` and so in the run's selection.json and metrics.json.
- Maps: `map_mode="posterior"` makes the per-position posterior that a position is abnormal
  (`map_posterior`, the type posteriors' mixture of the per-type maps) the anomaly map; any of AE-FLOW's map
  modes otherwise (default: AE-FLOW's). `map_posterior` is in the outputs either way.
- Rejected: a discriminative term (cross-entropy of the image posterior on labelled images, the "hybrid"
  objective). On 128-px phantoms (difficulty 0.5) with 20 labels it over-fitted them (test posterior AUROC
  0.47 / 0.55), and on PneumoniaMNIST it was no better than the generative FlowGMM objective alone (0.958
  against 0.951) while it turned the flow NLL upside down (AUROC 0.29).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.aeflow import AEFlow, CalibrationSet, _auroc_standard_error, _aurocs, _bits_per_dim
from aeflow.models.base import MIN_VALIDATION_PER_CLASS, register
from aeflow.nn.blocks import adopt_buffer_shapes, gaussian_blur
from aeflow.nn.flow import bits_per_dim, standard_normal_log_prob

#: gamma and the image-level posterior's weight a without labelled validation anomalies, the pair a validated
#: pair must beat, and the grids they are validated on (module docstring).
LABEL_FREE_GAMMA = 0.5
GAMMA_GRID = tuple(i / 20 for i in range(21))
LABEL_FREE_IMAGE_WEIGHT = 0.5
IMAGE_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
POSTERIOR_SPACES = ("reference", "latent")
#: EM iterations of the reference-space components, full batch over the labelled anomalies (converged before:
#: tests/models/test_aeflow_gmm.py checks that 2x as many steps move the components by less than 1e-4).
REFERENCE_EM_STEPS = 50
#: Normal training images (at most) whose pooled features give the image-level component's normal statistics.
IMAGE_NORMALS = 512


@register("aeflow_gmm")
class AEFlowGMM(AEFlow):
    """AE-FLOW with a Gaussian-mixture latent prior (a normal and one anomalous component per anomaly type);
    takes every AEFlow option, plus:

    gamma: weight of the standardised posterior log-odds in the image score (1 = posterior only), or
        "validated" (chosen on the validation split together with the image-level posterior's weight; see the
        module docstring). A fixed gamma keeps that weight at its label-free 0.5.
    anomaly_types: the anomaly types of the labelled images, one mixture component each (None: one component for
        every labelled anomaly). Training fills it from the labelled images when it is not given.
    map_mode: AE-FLOW's map modes, or "posterior" (`map_posterior`).
    image_component: add the image-level component (a linear discriminant of the pooled whitened latent; module
        docstring) to the reference-space posterior.
    latent_prior: train the deepest flow on the mixture prior (FlowGMM; True) or, False, every flow on the
        images not labelled anomalous only, the labels then entering through the reference-space components alone.
    posterior_space: where the posterior's components live: "reference" (the default with AE-FLOW's reference:
        z' whitened by the reference's per-position Gaussians, at every reference stage) or "latent" (the
        deepest flow's z', whose normal component N(0, I) the flow is trained towards); see the module docstring.
    unlabelled_anomaly_prior: pi1, the prior probability that an unlabelled image is anomalous; it also sets
        the prior odds in `score_posterior`.
    em_momentum: weight of each batch's EM estimate in the running anomalous-component statistics.
    initial_var, initial_fraction: the anomalous components' start (see the module docstring).

    Until a training batch has held a labelled anomaly, every output is AE-FLOW's; after that, predict adds
    `score_posterior`, `map_posterior` (B x H x W) and, with several types, `type_posterior` (B x T, p(type | z',
    anomalous), columns in the order of `anomaly_types`), and pred_score blends in the posterior.
    """

    learns_from_labelled_anomalies = True
    takes_anomaly_types = True
    # AE-FLOW options whose default differs here. The reference-space posterior whitens z' with the reference's
    # per-position Gaussians: the mixture keeps reference="position" (AE-FLOW's "memory" bank has no Gaussians to
    # whiten with) unless told otherwise.
    parent_option_defaults = {"reference": "position"}

    def __init__(self, *, gamma: float | str = "validated", anomaly_types: Sequence[str] | None = None,
                 map_mode: str = "position", posterior_space: str | None = None, latent_prior: bool = True,
                 image_component: bool = True,
                 unlabelled_anomaly_prior: float = 0.1, em_momentum: float = 0.05, initial_var: float = 4.0,
                 initial_fraction: float = 0.1, **aeflow_options):
        self.posterior_map = map_mode == "posterior"
        aeflow_options = {**self.parent_option_defaults, **aeflow_options}
        if self.posterior_map:  # AE-FLOW's own map until the mixture is trained
            map_mode = "position" if aeflow_options["reference"] != "none" else "residual"
        super().__init__(map_mode=map_mode, **aeflow_options)
        if gamma != "validated" and (isinstance(gamma, (bool, str)) or not 0.0 <= gamma <= 1.0):
            raise ConfigError(f"gamma must lie in [0, 1] or be 'validated', got {gamma!r}")
        if not 0.0 <= em_momentum <= 1.0:
            raise ConfigError(f"em_momentum must lie in [0, 1], got {em_momentum}")
        if not 0.0 < unlabelled_anomaly_prior < 1.0:
            raise ConfigError(f"unlabelled_anomaly_prior must lie in (0, 1), got {unlabelled_anomaly_prior}")
        if initial_var < 1.0 or not 0.0 < initial_fraction < 1.0:
            raise ConfigError(f"initial_var must be >= 1 and initial_fraction in (0, 1), got {initial_var}, "
                              f"{initial_fraction}")
        if anomaly_types is not None and (not anomaly_types or len(set(anomaly_types)) != len(anomaly_types)):
            raise ConfigError(f"anomaly_types must name distinct types, got {anomaly_types!r}")
        if posterior_space is None:
            posterior_space = "reference" if self.reference == "position" else "latent"
        if posterior_space not in POSTERIOR_SPACES or (posterior_space == "reference" and self.reference != "position"):
            raise ConfigError(f"posterior_space must be one of {POSTERIOR_SPACES} ('reference' needs "
                              f"reference='position'), got {posterior_space!r}")
        if not latent_prior and posterior_space != "reference":
            raise ConfigError("latent_prior=False trains no latent components: it needs posterior_space='reference'")
        self.posterior_space, self.latent_prior = posterior_space, bool(latent_prior)
        self.image_component = bool(image_component) and posterior_space == "reference"
        self.initial_var, self.initial_fraction = float(initial_var), float(initial_fraction)
        self.validated_gamma = gamma == "validated"
        self.anomaly_types = tuple(anomaly_types) if anomaly_types is not None else None
        self.log_pi = (math.log(1 - unlabelled_anomaly_prior), math.log(unlabelled_anomaly_prior))
        self.log_prior_odds = self.log_pi[1] - self.log_pi[0]
        self.em_momentum = em_momentum
        channels, types = self.encoder.out_channels, len(self.anomaly_types or ("anomalous",))
        # The anomalous components N(mu_t, diag(var_t)) and rho_t, estimated by EM from labelled anomalies.
        self.register_buffer("anomaly_mean", torch.zeros(types, channels))
        self.register_buffer("anomaly_var", torch.full((types, channels), float(initial_var)))
        self.register_buffer("anomaly_fraction", torch.full((types,), float(initial_fraction)))
        # True once a training batch held a labelled anomaly; until then every output is AE-FLOW's.
        self.register_buffer("semi_supervised", torch.tensor(False))
        self.register_buffer("posterior_mean", torch.zeros(()))
        self.register_buffer("posterior_std", torch.ones(()))
        self.register_buffer("gamma", torch.tensor(LABEL_FREE_GAMMA if self.validated_gamma else float(gamma)))
        # The same components in the reference's whitened coordinates, per reference stage (module docstring), and
        # each stage's whitening: the Cholesky factor L_p of the reference precision, w_p = L_p^T (z'_p - mu_p).
        self.register_buffer("reference_posterior", torch.tensor(False))
        for i in range(self.n_stages):
            d = len(getattr(self, f"reference_index{i}"))
            self.register_buffer(f"reference_anomaly_mean{i}", torch.zeros(types, d))
            self.register_buffer(f"reference_anomaly_var{i}", torch.full((types, d), self.initial_var))
            self.register_buffer(f"reference_anomaly_fraction{i}", torch.full((types,), self.initial_fraction))
            self.register_buffer(f"reference_whitener{i}", torch.empty(0))
        # The image-level component (module docstring): Gaussians of the pooled whitened latent with one precision.
        pooled = 2 * sum(len(getattr(self, f"reference_index{i}")) for i in range(self.n_stages))
        self.register_buffer("image_posterior", torch.tensor(False))
        self.register_buffer("image_normal_mean", torch.zeros(pooled))
        self.register_buffer("image_anomaly_mean", torch.zeros(types, pooled))
        self.register_buffer("image_type_seen", torch.zeros(types, dtype=torch.bool))
        self.register_buffer("image_precision", torch.zeros(pooled, pooled))
        self.register_buffer("image_posterior_mean", torch.zeros(()))
        self.register_buffer("image_posterior_std", torch.ones(()))
        self.register_buffer("image_weight", torch.tensor(LABEL_FREE_IMAGE_WEIGHT))

    # Prior ----------------------------------------------------------------------------------------------

    def log_likelihoods(self, z_prime: torch.Tensor, components: tuple[torch.Tensor, ...] | None = None
                        ) -> dict[str, torch.Tensor]:
        """log p(z' | normal), log p(z' | type t) (B x T), log p(z' | anomalous) = log mean_t p(z' | t),
        log p(z') under the image-level mixture (each (B,) unless said), and the per-position log-odds that a
        position of an anomalous image of type t is abnormal (B x T x h x w). `components`: the anomalous
        components' (mean, var, fraction), by default those of the flow's latent."""
        mean, var, fraction = components or (self.anomaly_mean, self.anomaly_var, self.anomaly_fraction)
        normal, per_type, position_log_odds = _per_position_mixture(z_prime, mean, var, fraction)
        log_anomalous = torch.logsumexp(per_type, 1) - math.log(per_type.shape[1])
        return {
            "normal": normal,
            "per_type": per_type,
            "anomalous": log_anomalous,
            "mixture": torch.logaddexp(self.log_pi[0] + normal, self.log_pi[1] + log_anomalous),
            "position_log_odds": position_log_odds,
        }

    def posterior_log_odds(self, z_prime: torch.Tensor) -> torch.Tensor:
        """log p(anomalous | z') - log p(normal | z') per image (B,): the logit of the posterior."""
        ll = self.log_likelihoods(z_prime)
        return self.log_prior_odds + ll["anomalous"] - ll["normal"]

    def type_index(self, anomaly_types: Sequence[str]) -> torch.Tensor:
        """The component of each labelled anomaly (0 for all without `anomaly_types`)."""
        if self.anomaly_types is None:
            return torch.zeros(len(anomaly_types), dtype=torch.long)
        unknown = sorted(set(anomaly_types) - set(self.anomaly_types))
        if unknown:
            raise ConfigError(f"labelled anomaly type {unknown[0]!r} has no mixture component: anomaly_types is "
                              f"{list(self.anomaly_types)}")
        return torch.tensor([self.anomaly_types.index(t) for t in anomaly_types], dtype=torch.long)

    # Loss -----------------------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """AE-FLOW's loss, alpha * L_flow + (1 - alpha) * MSE, with each image's deepest-stage flow likelihood
        taken under its label's prior (see the module docstring), the earlier stages' flow terms and the MSE over
        images not labelled anomalous; L_flow averages the stages as AE-FLOW's does."""
        x, labels = batch.image, batch.label.to(batch.image.device)
        latents, x_rec = self.flow_and_reconstruction(x)
        z_prime, log_det = latents[-1]
        anomalous = labels == 1
        types = self.type_index([t for t, a in zip(batch.anomaly_type, anomalous.tolist()) if a]).to(x.device)
        if self.training and anomalous.any():
            if self.latent_prior:
                self._em_step(z_prime.detach().float()[anomalous], types)
            self.semi_supervised.fill_(True)
        ll = self.log_likelihoods(z_prime.float())
        log_labelled = ll["normal"].clone()
        log_labelled[anomalous] = ll["per_type"][anomalous].gather(1, types[:, None])[:, 0]
        log_pz = torch.where(labels == 0, ll["normal"], torch.where(anomalous, log_labelled, ll["mixture"]))
        kept = ~anomalous
        stage_terms = [_bits_per_dim(z, d)[kept].mean() for z, d in latents[:-1]] if kept.any() else []
        deepest = bits_per_dim(log_pz, log_det.float(), z_prime[0].numel())
        if not self.latent_prior:
            deepest = deepest[kept] if kept.any() else deepest[:0]
        terms = [*stage_terms, *([deepest.mean()] if len(deepest) else [])]
        loss_flow = torch.stack(terms).mean() if terms else x.new_zeros(())
        loss_recon = F.mse_loss(x_rec[kept].float(), x[kept].float()) if kept.any() else x_rec.new_zeros(())
        losses = {"loss": self.alpha * loss_flow + (1 - self.alpha) * loss_recon, "loss_flow": loss_flow,
                  "loss_recon": loss_recon}
        if anomalous.any():
            losses["anomaly_fraction"] = self.anomaly_fraction.mean().clone()
            losses["anomaly_mean_norm"] = self.anomaly_mean.norm(dim=1).mean()
            losses["anomaly_var"] = self.anomaly_var.mean()
        return losses

    @torch.no_grad()
    def _em_step(self, z_anomalous: torch.Tensor, types: torch.Tensor) -> None:
        """One EM step per anomaly type in the batch, averaged with `em_momentum`, for mu_t, var_t and rho_t on the
        positions of that type's labelled images: responsibilities r_p = p(position abnormal | z'_p, t), then
        r-weighted mean, variance and mean r.

        The variance is kept >= 1 (abnormal tissue varies at least as much as normal tissue), which is also
        what breaks the symmetry of the start (mu = 0, var = 1, both components equal): the first step gives
        the anomalous component the spread of all positions of anomalous images, which is wider than N(0, I)."""
        odds = self.log_likelihoods(z_anomalous)["position_log_odds"]  # B x T x h x w
        m = self.em_momentum
        for t in types.unique().tolist():
            mine = types == t
            mean, var, fraction = _component_estimate(z_anomalous[mine], odds[mine, t])
            self.anomaly_mean[t].lerp_(mean, m)
            self.anomaly_var[t].lerp_(var, m)
            self.anomaly_fraction[t].lerp_(fraction, m)
        self.semi_supervised.fill_(True)

    # The reference-space posterior ----------------------------------------------------------------------

    @torch.no_grad()
    def fit_reference(self, images, *, all_reduce: bool = False) -> None:
        """AE-FLOW's reference from the normal training images and, from the labelled anomalies in the same pass
        (training's reference pass goes over normals and labelled anomalies), the reference-space components."""
        labelled: list[tuple[torch.Tensor, list[str]]] = []
        normals: list[torch.Tensor] = []

        def passing():
            for item in images:
                if isinstance(item, Batch) and bool((item.label == 1).any()):
                    anomalous = item.label == 1
                    labelled.append((item.image[anomalous].cpu(),
                                     [t for t, a in zip(item.anomaly_type, anomalous.tolist()) if a]))
                kept = sum(len(x) for x in normals)
                if self.image_component and kept < IMAGE_NORMALS:
                    batch_images = item.image[item.label <= 0] if isinstance(item, Batch) else item
                    normals.append(batch_images[: IMAGE_NORMALS - kept].cpu())
                yield item

        super().fit_reference(passing(), all_reduce=all_reduce)
        if self.posterior_space != "reference":
            return
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            shards: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, (labelled, normals))
            labelled = [part for shard in shards for part in shard[0]]
            normals = [part for shard in shards for part in shard[1]]
        if labelled:
            latents = self._latents_of(torch.cat([x for x, _ in labelled]))
            types = [t for _, ts in labelled for t in ts]
            self._fit_reference_components(latents, types)
            if self.image_component and sum(len(x) for x in normals) >= 2:
                self._fit_image_component(self._latents_of(torch.cat(normals)[:IMAGE_NORMALS]), latents, types)

    def _set_reference(self, sums) -> None:
        super()._set_reference(sums)
        for i in range(self.n_stages):
            precision = getattr(self, f"reference_precision{i}")
            setattr(self, f"reference_whitener{i}", torch.linalg.cholesky(precision.double()).float())

    def _whiten(self, i: int, z_prime: torch.Tensor) -> torch.Tensor:
        """Stage i's z' (B x C x h x w) -> w = L_p^T (z'_p - mu_p) on the reference's channels (B x d x h x w):
        N(0, I) at every position under the reference, and w_p . w_p is its squared Mahalanobis distance."""
        z = z_prime.float()[:, getattr(self, f"reference_index{i}")]
        b, d, h, w = z.shape
        diff = z.flatten(2).permute(2, 0, 1) - getattr(self, f"reference_mean{i}").unsqueeze(1)  # P x B x d
        return (diff @ getattr(self, f"reference_whitener{i}")).permute(1, 2, 0).reshape(b, d, h, w)

    def _reference_components(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(getattr(self, f"reference_anomaly_{kind}{i}") for kind in ("mean", "var", "fraction"))

    @torch.no_grad()
    def _latents_of(self, images: torch.Tensor) -> list[torch.Tensor]:
        """z' of `images` per stage (stride 16 last), in eval mode with the weights as they are, 32 at a time."""
        was_training = self.training
        self.eval()
        device = self.score_mean.device
        latents = [torch.cat(parts) for parts in zip(*(
            [z for z, _ in self.flow_latents(chunk.to(device).float())] for chunk in images.split(32)))]
        self.train(was_training)
        return latents

    @torch.no_grad()
    def _fit_reference_components(self, latents: list[torch.Tensor], anomaly_types: list[str]) -> None:
        """EM to convergence (REFERENCE_EM_STEPS full-batch steps from the broad start) for each type's component
        in each stage's whitened coordinates, on the labelled anomalies' z' (`latents`, per stage)."""
        index = self.type_index(anomaly_types).to(latents[0].device)
        for i in range(self.n_stages):
            w = self._whiten(i, latents[i])
            mean, var, fraction = (t.clone() for t in self._reference_components(i))
            mean.zero_(), var.fill_(self.initial_var), fraction.fill_(self.initial_fraction)
            for _ in range(REFERENCE_EM_STEPS):
                odds = _per_position_mixture(w, mean, var, fraction)[2]
                for t in index.unique().tolist():
                    mine = index == t
                    mean[t], var[t], fraction[t] = _component_estimate(w[mine], odds[mine, t])
            for kind, value in zip(("mean", "var", "fraction"), (mean, var, fraction)):
                getattr(self, f"reference_anomaly_{kind}{i}").copy_(value)
        self.reference_posterior.fill_(True)

    def _pooled(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Per image, the mean and std over positions of each channel of the whitened latent w, at every reference
        stage (B x G)."""
        parts = []
        for i in range(self.n_stages):
            w = self._whiten(i, latents[i]).flatten(2)
            parts += [w.mean(2), w.std(2)]
        return torch.cat(parts, 1)

    @torch.no_grad()
    def _fit_image_component(self, normals: list[torch.Tensor], anomalies: list[torch.Tensor],
                             anomaly_types: list[str]) -> None:
        """Linear discriminant analysis on the pooled whitened latent: the normal images' mean and covariance
        (Ledoit-Wolf shrinkage: a few hundred images for a few hundred features), each type's mean from its
        labelled images, the normal covariance shared (K labelled images cannot estimate their own)."""
        from sklearn.covariance import ledoit_wolf

        g_normal, g_anomalous = self._pooled(normals).double(), self._pooled(anomalies).double()
        covariance, _ = ledoit_wolf(g_normal.cpu().numpy())
        self.image_precision.copy_(torch.linalg.inv(torch.from_numpy(covariance)).float())
        self.image_normal_mean.copy_(g_normal.mean(0).float())
        index = self.type_index(anomaly_types)
        self.image_type_seen.zero_()
        for t in index.unique().tolist():
            self.image_anomaly_mean[t].copy_(g_anomalous[index.to(g_anomalous.device) == t].mean(0).float())
            self.image_type_seen[t] = True
        self.image_posterior.fill_(True)

    def _image_log_odds(self, pooled: torch.Tensor) -> torch.Tensor:
        """log mean_t N(g; m_t, S) / N(g; m_normal, S) over the labelled types t (B,)."""
        def squared(g, mean):
            diff = g - mean
            return ((diff @ self.image_precision) * diff).sum(-1)

        normal = squared(pooled, self.image_normal_mean)  # B
        per_type = torch.stack([squared(pooled, m) for m in self.image_anomaly_mean], 1)  # B x T
        per_type = (-0.5 * per_type).masked_fill(~self.image_type_seen, float("-inf"))
        return torch.logsumexp(per_type, 1) - math.log(int(self.image_type_seen.sum())) + 0.5 * normal

    # Scores ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """AE-FLOW's components, plus (once trained with labelled anomalies) `score_posterior`, the
        posterior log-odds of the anomalous components in `posterior_space` (with "reference", the latent one too, as
        `score_posterior_latent`), `map_posterior`, the per-position posterior that a position is abnormal (each
        type's, weighed by p(type | z', anomalous); averaged over the reference stages), up-sampled and smoothed like
        AE-FLOW's maps, and with several types `type_posterior` (B x T)."""
        latents: list[torch.Tensor] = []
        with self._on_latent(latents.append):
            parts = super().score_components(images)
        if not bool(self.semi_supervised):
            return parts
        size = images.shape[-2:]

        def posterior(stages: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            log_odds = self.log_prior_odds + sum(ll["anomalous"] - ll["normal"] for ll in stages)
            type_posterior = torch.softmax(sum(ll["per_type"] for ll in stages), 1)  # B x T
            maps = [F.interpolate((type_posterior[:, :, None, None] * torch.sigmoid(ll["position_log_odds"])).sum(
                1, keepdim=True), size=size, mode="bilinear", align_corners=False)[:, 0] for ll in stages]
            return log_odds, type_posterior, gaussian_blur(sum(maps) / len(maps), 4.0 * size[-1] / 256)

        if self.posterior_space == "reference" and bool(self.reference_posterior):
            chosen = posterior([self.log_likelihoods(self._whiten(i, latents[i]), self._reference_components(i))
                                for i in range(self.n_stages)])
            if bool(self.image_posterior):
                parts["score_posterior_image"] = self._image_log_odds(self._pooled(latents))
            if self.latent_prior:
                parts["score_posterior_latent"] = self.posterior_log_odds(latents[-1].float())
        else:
            chosen = posterior([self.log_likelihoods(latents[-1].float())])
        parts["score_posterior"], type_posterior, parts["map_posterior"] = chosen
        if self.anomaly_types is not None and len(self.anomaly_types) > 1:
            parts["type_posterior"] = type_posterior
        return parts

    def blend(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        score = super().blend(parts)
        if not bool(self.semi_supervised):
            return score
        return self.gamma * self._supervised(parts) + (1 - self.gamma) * score

    def _supervised(self, parts: dict[str, torch.Tensor], image_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The standardised posterior log-odds; with the image-level component, (1 - a) times the per-position
        one's plus a times its own (a = `image_weight`, the model's unless given: a scalar, or a row of candidates
        that gives one column each)."""
        z = (parts["score_posterior"] - self.posterior_mean) / self.posterior_std
        if "score_posterior_image" not in parts:
            return z
        a = self.image_weight if image_weight is None else image_weight
        z_image = (parts["score_posterior_image"] - self.image_posterior_mean) / self.image_posterior_std
        if a.ndim:
            z, z_image = z[:, None], z_image[:, None]
        return (1 - a) * z + a * z_image

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().predict(images)
        if self.posterior_map and "map_posterior" in out:
            out["anomaly_map"] = out["map_posterior"]
        return out

    @torch.no_grad()
    def fit_calibration(self, collected: CalibrationSet) -> None:
        """AE-FLOW's calibration, plus the mean and std of `score_posterior` over the same normal images and,
        with gamma="validated" and labelled validation anomalies, gamma and the image-level posterior's weight
        (see the module docstring)."""
        super().fit_calibration(collected)
        if not bool(self.semi_supervised):
            return
        labels = collected.label_tensor()
        posterior = collected.component("score_posterior")
        self.posterior_mean.fill_(posterior[labels <= 0].mean())
        self.posterior_std.fill_(posterior[labels <= 0].std().clamp_min(1e-12))
        image = collected.component("score_posterior_image")
        if len(image):
            self.image_posterior_mean.fill_(image[labels <= 0].mean())
            self.image_posterior_std.fill_(image[labels <= 0].std().clamp_min(1e-12))
        anomalous = labels == 1
        if not self.validated_gamma:
            return
        self.gamma.fill_(LABEL_FREE_GAMMA)
        self.image_weight.fill_(LABEL_FREE_IMAGE_WEIGHT)
        if min(int((~anomalous).sum()), int(anomalous.sum())) < MIN_VALIDATION_PER_CLASS:
            return
        weights = IMAGE_WEIGHT_GRID if len(image) else (LABEL_FREE_IMAGE_WEIGHT,)
        z_posterior = self._supervised({"score_posterior": posterior,
                                        **({"score_posterior_image": image} if len(image) else {})},
                                       torch.tensor(weights)).double().reshape(len(labels), len(weights))
        aeflow_score = AEFlow.blend(self, {name: collected.component(name) for name in self.components}).double()
        grid = torch.tensor(GAMMA_GRID, dtype=torch.float64)
        # candidates: column (a, gamma), a-major
        blends = z_posterior[:, :, None] * grid + aeflow_score[:, None, None] * (1 - grid)
        aurocs = _aurocs(blends.flatten(1), anomalous)
        label_free = float(aurocs[weights.index(LABEL_FREE_IMAGE_WEIGHT) * len(grid)
                                  + GAMMA_GRID.index(LABEL_FREE_GAMMA)])
        i = int(aurocs.argmax())
        if float(aurocs[i]) > label_free + _auroc_standard_error(label_free, int(anomalous.sum()),
                                                                 int((~anomalous).sum())):
            self.image_weight.fill_(weights[i // len(grid)])
            self.gamma.fill_(GAMMA_GRID[i % len(grid)])

    def blend_weights(self) -> dict[str, float]:
        """AE-FLOW's blend weights (its part of the score) and, once trained with labels, gamma and (with the
        image-level component) the image-level posterior's weight in the posterior part."""
        weights = super().blend_weights()
        if bool(self.semi_supervised):
            weights["gamma"] = float(self.gamma)
            if bool(self.image_posterior):
                weights["posterior_image_weight"] = float(self.image_weight)
        return weights

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs saved before the per-type components hold one component as vectors and no gamma buffer (their
        # gamma is the fixed number of their config, which this model was built with).
        for name in ("anomaly_mean", "anomaly_var", "anomaly_fraction"):
            value = state_dict.get(prefix + name)
            if value is not None and value.ndim == getattr(self, name).ndim - 1:
                state_dict[prefix + name] = value[None]
        adopt_buffer_shapes(self, state_dict, prefix, [f"reference_whitener{i}" for i in range(self.n_stages)])
        if prefix + "anomaly_mean" in state_dict:
            for name, value in self.named_buffers(recurse=False):
                if name == "gamma" or name.startswith(("reference_anomaly_", "reference_whitener", "reference_posterior",
                                                       "image_")):
                    state_dict.setdefault(prefix + name, value.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @contextmanager
    def _on_latent(self, receive: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """Hand every z' the flows compute inside the block to `receive`, stage by stage (stride 16 last): AE-FLOW's
        scoring and calibration then run unchanged, in one forward pass, and the posterior is computed from the
        same z'."""
        handles = [flow.register_forward_hook(lambda module, inputs, output: receive(output[0]))
                   for flow in (*self.side_flows, self.flow)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _per_position_mixture(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, fraction: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For z (B x C x h x w) and T components N(mean_t, diag var_t) (T x C) with fractions rho_t (T): log N(z; 0, I)
    summed over positions (B), each type's sum over positions of log((1 - rho_t) N(z_p; 0, I) + rho_t
    N(z_p; mean_t, var_t)) (B x T), and the per-position log-odds log rho_t N(z_p; mean_t, var_t) - log (1 - rho_t)
    N(z_p; 0, I) (B x T x h x w)."""
    normal = standard_normal_log_prob(z).sum(1)[:, None]  # B x 1 x h x w
    std = var.sqrt()[:, :, None, None]  # T x C x 1 x 1
    abnormal = (standard_normal_log_prob((z[:, None] - mean[:, :, None, None]) / std) - std.log()).sum(2)
    rho = fraction[:, None, None]
    position = torch.logaddexp((1 - rho).log() + normal, rho.log() + abnormal)  # B x T x h x w
    return normal.flatten(1).sum(1), position.flatten(2).sum(2), rho.log() + abnormal - (1 - rho).log() - normal


def _component_estimate(z: torch.Tensor, log_odds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The M step for one anomalous component from its images' positions z (b x C x h x w) and their log-odds of
    being abnormal (b x h x w): responsibilities r = sigmoid(log-odds), the r-weighted mean and variance (kept >= 1)
    and the mean r (the fraction rho, kept in [0.01, 0.99])."""
    r = torch.sigmoid(log_odds)[:, None]
    weight = r.sum().clamp_min(1e-6)
    mean = (r * z).sum((0, 2, 3)) / weight
    var = (r * (z - mean.view(1, -1, 1, 1)).pow(2)).sum((0, 2, 3)) / weight
    return mean, var.clamp_min(1.0), r.mean().clamp(0.01, 0.99)
