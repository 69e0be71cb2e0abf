"""Anomaly detection models: one file per method, all behind `AnomalyModel` and the registry."""

from aeflow.models.base import AnomalyModel, available_models, create_model, register

# Importing a model's module registers it.
from aeflow.models import ae, aeflow, aeflow_gmm, cevae, cflow, differnet, draem, fastflow, ganomaly, padim, patchcore, vae  # noqa: E402,F401  isort: skip

__all__ = ["AnomalyModel", "available_models", "create_model", "register"]
