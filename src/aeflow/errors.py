"""The project's own errors: every failure a user can cause names the file or value and the reason."""

from __future__ import annotations

from pathlib import Path


class AeflowError(Exception):
    """Base class of every error aeflow raises on purpose."""


class ConfigError(AeflowError, ValueError):
    """A parameter or option has a value aeflow cannot use."""


class DataError(AeflowError):
    """A data set, folder or layout cannot be read as asked."""


class BadFileError(DataError):
    """One file cannot be read: it names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(AeflowError):
    """Pretrained weights are missing or do not fit the network."""


class CheckpointError(AeflowError):
    """A checkpoint is missing, corrupt or unsafe to load."""


class TooLargeError(BadFileError):
    """A file declares more pixels, frames or bytes than the limits allow (refused before decoding)."""
