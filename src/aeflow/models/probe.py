"""The supervised probe: what a handful of labelled anomalies buys without any anomaly-detection model.

A baseline for the semi-supervised mode (`--labelled-anomalies K`), the sanity check a reader of a
semi-supervised result asks for first: a frozen ImageNet backbone cut at stride 16 (as AE-FLOW's encoder) gives
each image a C x h x w feature map; the image is described by the per-channel mean and standard deviation of
that map over positions (2C numbers); a logistic regression (scikit-learn, class-balanced, inputs standardised,
L2 with C = 1) is fitted on the normal training images (label 0) and the K labelled anomalies (label 1). The image
score is its logit.

The map: the logit is linear in the per-channel means, and a mean over positions of a per-position term w . f_ij,
so the per-position term of that part (standardised like the inputs), up-sampled and smoothed, is the probe's
class-activation map. The standard deviations' part has no per-position form and is left out of the map; the
map is a by-product, not what the probe is fitted for.

Fitting runs in one process (scikit-learn); the features of every batch are kept in memory (2C floats per image).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from aeflow.errors import AeflowError, ConfigError, DataError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.backbones import create_backbone
from aeflow.nn.blocks import gaussian_blur


@register("supervised_probe")
class SupervisedProbe(AnomalyModel):
    """Logistic regression on the per-channel mean and std of frozen `backbone` stride-16 features; needs labelled
    anomalies (`labelled_anomalies` >= 1 in training). `regularization` is scikit-learn's C."""

    trained_by_gradient = False
    learns_from_labelled_anomalies = True

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, weights: str | None = None,
                 regularization: float = 1.0, blur_sigma: float = 4.0):
        super().__init__()
        if regularization <= 0:
            raise ConfigError(f"regularization (the inverse L2 strength C) must be > 0, got {regularization}")
        self.encoder = create_backbone(backbone, pretrained=pretrained, weights=weights, frozen=True)
        channels = self.encoder.out_channels
        # The standardisation of the 2C inputs and the fitted weights; buffers, so they travel with the run.
        self.register_buffer("input_mean", torch.zeros(2 * channels))
        self.register_buffer("input_scale", torch.ones(2 * channels))
        self.register_buffer("weight", torch.zeros(2 * channels))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("fitted", torch.tensor(False))

    def describe(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x 2C image descriptors: per-channel mean then std over positions, the B x C x h x w feature map)."""
        features = self.encoder(images.float())
        flat = features.flatten(2)
        return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], 1), features

    @torch.no_grad()
    def fit(self, loader) -> None:
        from sklearn.linear_model import LogisticRegression

        descriptors, labels = [], []
        for batch in loader:
            descriptors.append(self.describe(batch.image.to(self.weight.device))[0].double().cpu())
            labels.append(batch.label.cpu())
        x = torch.cat(descriptors).numpy()
        y = (torch.cat(labels) == 1).numpy().astype(int)
        if y.sum() == 0 or y.sum() == len(y):
            raise DataError("the supervised probe needs labelled anomalies and normal images to fit on: train it with "
                            "--labelled-anomalies K (K >= 1)")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        classifier = LogisticRegression(C=self._config["regularization"], class_weight="balanced", max_iter=5000)
        classifier.fit((x - mean) / scale, y)
        device = self.weight.device
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32, device=device))
        self.input_scale.copy_(torch.as_tensor(scale, dtype=torch.float32, device=device))
        self.weight.copy_(torch.as_tensor(classifier.coef_[0], dtype=torch.float32, device=device))
        self.bias.fill_(float(classifier.intercept_[0]))
        self.fitted.fill_(True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not bool(self.fitted):
            raise AeflowError("the supervised probe has not been fitted: call fit(loader) with labelled anomalies first")
        descriptors, features = self.describe(images)
        logit = ((descriptors - self.input_mean) / self.input_scale) @ self.weight + self.bias
        c = features.shape[1]
        # The per-position part of the mean features' term: w_c / s_c * (f_cij - m_c), summed over channels.
        per_position = torch.einsum("bchw,c->bhw", features - self.input_mean[:c, None, None],
                                    self.weight[:c] / self.input_scale[:c])
        anomaly_map = F.interpolate(per_position[:, None], size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        sigma = self._config["blur_sigma"] * images.shape[-1] / 256
        return {"pred_score": logit, "anomaly_map": gaussian_blur(anomaly_map, sigma)}
