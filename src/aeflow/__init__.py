"""aeflow: anomaly detection in medical images, built around AE-FLOW."""

__version__ = "0.1.0"
