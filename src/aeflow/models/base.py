"""The interface every anomaly model implements, and the registry that names them.

A model is a pure `torch.nn.Module`: no training framework inside. The lightning wrapper in
`aeflow.training` drives any model through these methods, so every method shares one training and
evaluation path.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

from aeflow.data.sample import Batch
from aeflow.errors import ConfigError


#: Fewest validation images of EACH class (normal, anomalous) for a choice to be made on validation AUROC (the kept
#: checkpoint, AE-FLOW's blend weights). The AUROC of n + n images has a standard error of about 0.3 / sqrt(n)
#: (Hanley-McNeil, AUROC ~0.8): 0.1 at 8 + 8, where the best of several epochs is mostly the luckiest, and 0.06 at
#: 20 + 20. Below it, choices fall back to what needs no labels.
MIN_VALIDATION_PER_CLASS = 20


class ScoreCollection:
    """Score components (`score_*` outputs) of validation images with their labels: what a model's
    `fit_calibration` needs (AE-FLOW, MNAD). Filled batch by batch, by the model's `calibrate` or by the training
    loop's validation pass (aeflow.training.module), so both fit the calibration the same way."""

    def __init__(self):
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.labels: list[torch.Tensor] = []

    def add(self, parts: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for name, value in parts.items():
            if name.startswith("score_"):
                self.scores.setdefault(name, []).append(value.detach().double().cpu())
        self.labels.append(labels.detach().cpu())

    def component(self, name: str) -> torch.Tensor:
        return torch.cat(self.scores[name]) if self.scores.get(name) else torch.empty(0, dtype=torch.float64)

    def label_tensor(self) -> torch.Tensor:
        return torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long)


class AnomalyModel(nn.Module):
    """Trained on normal images; gives every image a score and every pixel an anomaly value.

    Subclasses set `name` and implement `loss` (gradient-trained models) or `fit` (memory-bank
    models such as PaDiM / PatchCore, which set `trained_by_gradient = False`), and `predict`.
    """

    name: str = "base"
    trained_by_gradient: bool = True
    gives_pixel_maps: bool = True  # False: predict's anomaly_map is the image score at every pixel
    #: Constructor options added after runs were saved, with the value that such runs' models implicitly had; a
    #: saved config without the option is rebuilt with it (`saved_model_options`), a new model gets the default.
    options_of_older_runs: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_arguments(cls.__init__)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training losses for one batch of (normal) images; the dict must hold the key "loss"."""
        raise NotImplementedError

    def fit(self, loader) -> None:
        """One pass over the training images for models that are not trained by gradient descent."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score a batch B x C x H x W.

        Returns at least `pred_score` (B,) (higher = more anomalous) and `anomaly_map` (B, H, W) at the
        input resolution. Models whose score blends several components also return each component
        as `score_<component>` (B,) so that evaluation can report them on their own.
        """
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable constructor arguments: `registry[name](**config())` rebuilds the model.

        Recorded for every subclass as it is constructed (defaults included, tuples as lists), also readable
        as `self._config` during and after `__init__`."""
        return dict(self._config)


def _recording_arguments(init: Callable) -> Callable:
    """Wrap a model's __init__ so that the constructor arguments land in `self._config` before it runs.

    The outermost constructor's arguments win (a subclass may pass other values to its parent); arguments that
    only a parent's constructor names (a subclass forwarding **options) are added with the parent's defaults.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = {}
        for position, (name, value) in enumerate(bound.arguments.items()):
            if position == 0:
                continue  # self
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        arguments = {name: _as_json(value) for name, value in arguments.items()}
        recorded = self.__dict__.get("_config")
        if recorded is None:
            object.__setattr__(self, "_config", arguments)
        else:
            for name, value in arguments.items():
                recorded.setdefault(name, value)
        init(self, *args, **kwargs)

    return recording_init


def _as_json(value):
    return [_as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


_REGISTRY: dict[str, Callable[..., AnomalyModel]] = {}


def register(name: str):
    """Class decorator: make a model constructible by name from the CLI and the Python API."""

    def add(cls):
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def saved_model_options(name: str, options: dict) -> dict:
    """The constructor options of a saved run's model: its recorded config, plus the value older runs had for
    every option added to the model since they were saved (`AnomalyModel.options_of_older_runs`)."""
    model_class = _REGISTRY.get(name)
    return {**(model_class.options_of_older_runs if model_class else {}), **options}


def create_model(name: str, **kwargs) -> AnomalyModel:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models()) or 'none'}")
    return _REGISTRY[name](**kwargs)
