"""Semi-supervised AE-FLOW: the flow latent gets a Gaussian-mixture prior (FlowGMM, Izmailov et al. 2020).

Hospitals usually hold a few confirmed abnormal cases; plain AE-FLOW ignores them. Here the flow's latent z'
(C x h x w) has two components, "normal" and "anomalous", and each image trains on the likelihood of its label:

- normal (label 0): N(z'; 0, I), exactly AE-FLOW's prior, so with no labelled anomaly the loss, the weights
  and the scores are AE-FLOW's (the K = 0 reduction, tested);
- anomalous (label 1): each spatial position's C-vector z'_p is drawn from the per-position mixture
  (1 - rho) N(0, I_C) + rho N(mu, diag(var)): an abnormal image is a normal one in which a fraction rho of the
  positions show the abnormality (a lesion covers a few positions, pneumonia many);
- unlabelled (label -1, e.g. a contaminated training pool): the image-level mixture
  pi0 p(z' | normal) + pi1 p(z' | anomalous), pi1 = `unlabelled_anomaly_prior`. (aeflow's layouts label
  their training images normal, so this case is there for data that say -1.)

The flow loss is AE-FLOW's bits per dimension, -(log p(z' | label) + log|det|) / (D ln 2); the reconstruction
loss stays on images not labelled anomalous, so the decoder still learns what normal looks like.

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
- Image score: `gamma` * z(score_posterior) + (1 - gamma) * AE-FLOW's image score, z() standardising on normal
  validation images (`calibrate`) as AE-FLOW's "standardized" mode does. Default gamma = 1 (posterior only):
  on PneumoniaMNIST (K = 20, 3 epochs, seed 0) the posterior alone ranked best (test AUROC 0.951; the 0.5 blend
  with AE-FLOW's score 0.935), and AE-FLOW's components stay in the output for whoever wants the blend.
- Rejected: a discriminative term (cross-entropy of the image posterior on labelled images, the "hybrid"
  objective). On 128-px phantoms (difficulty 0.5) with 20 labels it over-fitted them (test posterior AUROC
  0.47 / 0.55), and on PneumoniaMNIST it was no better than the generative FlowGMM objective alone (0.958
  against 0.951) while it turned the flow NLL upside down (AUROC 0.29).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError
from aeflow.models.aeflow import AEFlow, CalibrationSet
from aeflow.models.base import register
from aeflow.nn.blocks import gaussian_blur
from aeflow.nn.flow import bits_per_dim, standard_normal_log_prob

@register("aeflow_gmm")
class AEFlowGMM(AEFlow):
    """AE-FLOW with a two-component Gaussian-mixture latent prior; takes every AEFlow option, plus:

    gamma: weight of the standardised posterior log-odds in the image score (1 = posterior only).
    unlabelled_anomaly_prior: pi1, the prior probability that an unlabelled image is anomalous; it also sets
        the prior odds in `score_posterior`.
    em_momentum: weight of each batch's EM estimate in the running anomalous-component statistics.
    initial_var, initial_fraction: the anomalous component's start (see the module docstring).

    Until a training batch has held a labelled anomaly, every output is AE-FLOW's; after that, predict adds
    `score_posterior` and `map_posterior` (B x H x W), and pred_score uses the posterior.
    """

    learns_from_labelled_anomalies = True

    def __init__(self, *, gamma: float = 1.0, unlabelled_anomaly_prior: float = 0.1, em_momentum: float = 0.05,
                 initial_var: float = 4.0, initial_fraction: float = 0.1, **aeflow_options):
        aeflow_options.setdefault("stages", (16,))
        super().__init__(**aeflow_options)
        if self.side_flows:
            raise ConfigError("aeflow_gmm puts its mixture prior on the stride-16 latent only: use stages=[16]")
        for name, value in (("gamma", gamma), ("em_momentum", em_momentum)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 < unlabelled_anomaly_prior < 1.0:
            raise ConfigError(f"unlabelled_anomaly_prior must lie in (0, 1), got {unlabelled_anomaly_prior}")
        if initial_var < 1.0 or not 0.0 < initial_fraction < 1.0:
            raise ConfigError(f"initial_var must be >= 1 and initial_fraction in (0, 1), got {initial_var}, "
                              f"{initial_fraction}")
        self.gamma = gamma
        self.log_pi = (math.log(1 - unlabelled_anomaly_prior), math.log(unlabelled_anomaly_prior))
        self.log_prior_odds = self.log_pi[1] - self.log_pi[0]
        self.em_momentum = em_momentum
        channels = self.encoder.out_channels
        # The anomalous component N(mu, diag(var)) and rho, estimated by EM from labelled anomalies.
        self.register_buffer("anomaly_mean", torch.zeros(channels))
        self.register_buffer("anomaly_var", torch.full((channels,), float(initial_var)))
        self.register_buffer("anomaly_fraction", torch.tensor(float(initial_fraction)))
        # True once a training batch held a labelled anomaly; until then every output is AE-FLOW's.
        self.register_buffer("semi_supervised", torch.tensor(False))
        self.register_buffer("posterior_mean", torch.zeros(()))
        self.register_buffer("posterior_std", torch.ones(()))

    # Prior ----------------------------------------------------------------------------------------------

    def log_likelihoods(self, z_prime: torch.Tensor) -> dict[str, torch.Tensor]:
        """log p(z' | normal), log p(z' | anomalous), log p(z') under the mixture (each (B,)), and the
        per-position log-odds that a position of an anomalous image is abnormal (B x h x w)."""
        normal = standard_normal_log_prob(z_prime).sum(1)  # B x h x w
        std = self.anomaly_var.sqrt().view(1, -1, 1, 1)
        abnormal = (standard_normal_log_prob((z_prime - self.anomaly_mean.view(1, -1, 1, 1)) / std) - std.log()).sum(1)
        log_rho, log_not_rho = self.anomaly_fraction.log(), (1 - self.anomaly_fraction).log()
        position = torch.logaddexp(log_not_rho + normal, log_rho + abnormal)
        log_normal, log_anomalous = normal.flatten(1).sum(1), position.flatten(1).sum(1)
        return {
            "normal": log_normal,
            "anomalous": log_anomalous,
            "mixture": torch.logaddexp(self.log_pi[0] + log_normal, self.log_pi[1] + log_anomalous),
            "position_log_odds": log_rho + abnormal - log_not_rho - normal,
        }

    def posterior_log_odds(self, z_prime: torch.Tensor) -> torch.Tensor:
        """log p(anomalous | z') - log p(normal | z') per image (B,): the logit of the posterior."""
        ll = self.log_likelihoods(z_prime)
        return self.log_prior_odds + ll["anomalous"] - ll["normal"]

    # Loss -----------------------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """AE-FLOW's loss, alpha * L_flow + (1 - alpha) * MSE, with each image's flow likelihood taken under
        its label's prior (see the module docstring) and the MSE over images not labelled anomalous."""
        x, labels = batch.image, batch.label.to(batch.image.device)
        z_prime, log_det, x_rec = self(x)
        if self.training and (labels == 1).any():
            self._em_step(z_prime.detach().float()[labels == 1])
        ll = self.log_likelihoods(z_prime.float())
        log_pz = torch.where(labels == 1, ll["anomalous"], torch.where(labels == 0, ll["normal"], ll["mixture"]))
        loss_flow = bits_per_dim(log_pz, log_det.float(), z_prime[0].numel()).mean()
        kept = labels != 1
        loss_recon = F.mse_loss(x_rec[kept].float(), x[kept].float()) if kept.any() else x_rec.new_zeros(())
        losses = {"loss": self.alpha * loss_flow + (1 - self.alpha) * loss_recon, "loss_flow": loss_flow,
                  "loss_recon": loss_recon}
        if (labels == 1).any():
            losses["anomaly_fraction"] = self.anomaly_fraction.clone()
            losses["anomaly_mean_norm"] = self.anomaly_mean.norm()
            losses["anomaly_var"] = self.anomaly_var.mean()
        return losses

    @torch.no_grad()
    def _em_step(self, z_anomalous: torch.Tensor) -> None:
        """One EM step, averaged with `em_momentum`, for mu, var and rho on the positions of labelled anomalous
        images: responsibilities r_p = p(position abnormal | z'_p), then r-weighted mean, variance and mean r.

        The variance is kept >= 1 (abnormal tissue varies at least as much as normal tissue), which is also
        what breaks the symmetry of the start (mu = 0, var = 1, both components equal): the first step gives
        the anomalous component the spread of all positions of anomalous images, which is wider than N(0, I)."""
        r = torch.sigmoid(self.log_likelihoods(z_anomalous)["position_log_odds"])[:, None]  # B x 1 x h x w
        weight = r.sum().clamp_min(1e-6)
        mean = (r * z_anomalous).sum((0, 2, 3)) / weight
        var = (r * (z_anomalous - mean.view(1, -1, 1, 1)).pow(2)).sum((0, 2, 3)) / weight
        m = self.em_momentum
        self.anomaly_mean.lerp_(mean, m)
        self.anomaly_var.lerp_(var.clamp_min(1.0), m)
        self.anomaly_fraction.lerp_(r.mean().clamp(0.01, 0.99), m)
        self.semi_supervised.fill_(True)

    # Scores ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_components(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """AE-FLOW's components, plus (once trained with labelled anomalies) `score_posterior`, the
        posterior log-odds of the anomalous component, and `map_posterior`, the per-position posterior
        that a position is abnormal, up-sampled and smoothed like AE-FLOW's flow map."""
        latents: list[torch.Tensor] = []
        with self._on_latent(latents.append):
            parts = super().score_components(images)
        if not bool(self.semi_supervised):
            return parts
        ll = self.log_likelihoods(latents[0].float())
        position = torch.sigmoid(ll["position_log_odds"])[:, None]
        size = images.shape[-2:]
        upsampled = F.interpolate(position, size=size, mode="bilinear", align_corners=False)[:, 0]
        parts["score_posterior"] = self.log_prior_odds + ll["anomalous"] - ll["normal"]
        parts["map_posterior"] = gaussian_blur(upsampled, 4.0 * size[-1] / 256)
        return parts

    def blend(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        score = super().blend(parts)
        if not bool(self.semi_supervised):
            return score
        z_posterior = (parts["score_posterior"] - self.posterior_mean) / self.posterior_std
        return self.gamma * z_posterior + (1 - self.gamma) * score

    @torch.no_grad()
    def fit_calibration(self, collected: CalibrationSet) -> None:
        """AE-FLOW's calibration, plus the mean and std of `score_posterior` over the same normal images."""
        super().fit_calibration(collected)
        if bool(self.semi_supervised):
            values = collected.component("score_posterior")[collected.label_tensor() <= 0]
            self.posterior_mean.fill_(values.mean())
            self.posterior_std.fill_(values.std().clamp_min(1e-12))

    @contextmanager
    def _on_latent(self, receive: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """Hand every z' the flow computes inside the block to `receive`: AE-FLOW's scoring and calibration
        then run unchanged, in one forward pass, and the posterior is computed from the same z'."""
        handle = self.flow.register_forward_hook(lambda module, inputs, output: receive(output[0]))
        try:
            yield
        finally:
            handle.remove()
