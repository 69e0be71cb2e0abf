"""Anomaly detection models: one file per method, all behind `AnomalyModel` and the registry."""

from aeflow.models.base import AnomalyModel, available_models, create_model, register

__all__ = ["AnomalyModel", "available_models", "create_model", "register"]
