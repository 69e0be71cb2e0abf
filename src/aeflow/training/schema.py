"""The schema of a run folder's config.json, checked when a run is loaded, before anything is built from it.

A run folder may come from anywhere (a colleague, an archive, an attacker), so nothing in config.json is trusted:

- the document is a JSON object of at most MAX_CONFIG_BYTES with a "train" object and a "model_config" object;
- "train" holds TrainConfig's fields only, each of its type and within its bounds (`TRAIN_FIELDS`);
- "model_config" holds only keywords the registered model's constructor takes, each a JSON scalar or a short list
  or object of them (nested at most 3 deep); whole numbers are at most MAX_MODEL_INT (widths, steps, sizes),
  strings at most 256 characters;
- the model those keywords describe is built on PyTorch's "meta" device (shapes only, no memory) and its weights'
  names and shapes must be those in the weights file's header, so a config that would allocate more than the run
  holds is refused before a single weight is allocated.

Each violation is a ConfigError (or CheckpointError, for weights that do not fit) naming the file, the key and
the reason. `check_model_options` is the same keyword check for options given on the command line.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch

from aeflow.errors import CheckpointError, ConfigError

#: Largest config.json read.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Largest whole number a model keyword may hold (layer widths, flow steps, feature sizes, counts).
MAX_MODEL_INT = 4096
_MAX_LIST = 64
_MAX_STRING = 256


def _whole(lo: int, hi: int):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {_show(value)}"
        return None if lo <= value <= hi else f"must be in {lo}..{hi}, got {value}"
    return check


def _real(lo: float, hi: float):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, got {_show(value)}"
        return None if lo <= value <= hi else f"must be in {lo:g}..{hi:g}, got {value:g}"
    return check


def _one_of(*choices):
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}"
    return check


def _text(*, optional: bool = False):
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > _MAX_STRING:
            return f"must be a string of at most {_MAX_STRING} characters, got {_show(value)}"
        return None
    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _either(*checks):
    def check(value: Any) -> str | None:
        reasons = [c(value) for c in checks]
        return None if None in reasons else " or ".join(reasons)
    return check


def _object(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"must be an object, got {_show(value)}"


#: What TrainConfig's fields may hold; a field added to TrainConfig and not listed here is checked like a model
#: keyword (a JSON scalar or a short list of them, numbers bounded).
TRAIN_FIELDS = {
    "model": _text(),
    "model_kwargs": _object,
    "data": _object,
    "image_size": _whole(16, 4096),
    "channels": _one_of(1, 3),
    "seed": _whole(0, 2**32 - 1),
    "batch_size": _whole(1, 65536),
    "lr": _real(0.0, 10.0),
    "weight_decay": _real(0.0, 10.0),
    "max_epochs": _whole(1, 10**6),
    "patience": _optional(_whole(1, 10**6)),
    "precision": _one_of("32-true", "bf16-mixed", "16-mixed"),
    "accelerator": _text(),
    "devices": _either(_whole(1, 1024), _text()),
    "strategy": _one_of("auto", "ddp", "ddp_spawn"),
    "num_nodes": _whole(1, 4096),
    "num_workers": _whole(0, 256),
    "progress_bar": _one_of(True, False),
    "preset": _text(optional=True),
    "labelled_anomalies": _whole(0, 10**6),
    "select_on": _one_of("auto", "val_loss"),
}
#: The training settings a saved run cannot do without (how to rebuild and feed its model).
REQUIRED_TRAIN_FIELDS = ("model", "image_size", "channels")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config(path: str | Path) -> dict:
    """config.json as a dict: ConfigError for a missing, oversized or non-JSON file, or one that is not an object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes, over the limit of {MAX_CONFIG_BYTES} for a run's config")
        document = json.loads(path.read_text(encoding="utf-8"))
    except ConfigError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: cannot read the run's config ({type(exc).__name__}: {exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the run's config must be a JSON object, got {_show(document)}")
    return document


def validate_config(document: dict, path: str | Path) -> None:
    """Check a run's config.json document against the schema (see the module docstring); ConfigError if not."""
    for key in ("train", "model_config"):
        if key not in document:
            raise ConfigError(f"{path}: no '{key}' section")
        if not isinstance(document[key], dict):
            raise ConfigError(f"{path}: '{key}' must be an object, got {_show(document[key])}")
    import dataclasses

    from aeflow.training.run import TrainConfig

    train = document["train"]
    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{path}: unknown training setting(s) {', '.join(map(repr, unknown))}")
    missing = [key for key in REQUIRED_TRAIN_FIELDS if key not in train]
    if missing:
        raise ConfigError(f"{path}: training setting(s) {', '.join(map(repr, missing))} missing")
    for key, value in train.items():
        reason = TRAIN_FIELDS[key](value) if key in TRAIN_FIELDS else _model_value(value)
        if reason:
            raise ConfigError(f"{path}: train.{key} {reason}")
    if train["image_size"] % 16:
        raise ConfigError(f"{path}: train.image_size must be a multiple of 16, got {train['image_size']}")
    intensity = train.get("data", {}).get("intensity", "auto")
    if not isinstance(intensity, str):
        raise ConfigError(f"{path}: train.data.intensity must be a string, got {_show(intensity)}")
    from aeflow.data import parse_intensity

    try:
        parse_intensity(intensity)
    except ConfigError as error:
        raise ConfigError(f"{path}: train.data.intensity: {error}") from None
    check_model_options(train["model"], document["model_config"], where=f"{path}: model_config")
    for key in ("calibration_holdout", "labelled_anomalies"):
        value = document.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: '{key}' must be a list of file names")


def check_model_options(model: str, options: Any, *, where: str = "model options") -> None:
    """The options name keywords the model's constructor takes, each a JSON scalar (or a short list of them)
    within bounds; ConfigError naming the first that is not, with the valid keywords."""
    from aeflow.models import available_models
    from aeflow.models.base import _REGISTRY  # the registered classes: their constructors define the keywords

    if model not in available_models():
        raise ConfigError(f"{where}: unknown model {model!r}; available: {', '.join(available_models())}")
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be an object of keyword: value, got {_show(options)}")
    names, takes_any = model_keywords(_REGISTRY[model])
    for key, value in options.items():
        if key not in names and not takes_any:
            raise ConfigError(f"{where}: model {model!r} has no option {key!r}; its options are: "
                              f"{', '.join(sorted(names))}")
        reason = _model_value(value)
        if reason:
            raise ConfigError(f"{where}: {key} {reason}")


def model_keywords(cls: type) -> tuple[set[str], bool]:
    """The keywords a model class's constructor takes, following `**options` handed on to the base class (as
    AE-FLOW-GMM hands its options to AE-FLOW), and whether it takes any keyword at all."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in parameters.items() if n != "self" and p.kind in
                  (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names, False
        if klass.__init__ is object.__init__:
            break
    return names, True


def _model_value(value: Any, depth: int = 0) -> str | None:
    if depth > 3:
        return "is nested too deeply"
    if isinstance(value, dict):  # options handed on to an inner model (e.g. AE-FLOW-GMM's aeflow_options)
        if len(value) > _MAX_LIST:
            return f"has {len(value)} keys, over the limit of {_MAX_LIST}"
        for key, item in value.items():
            reason = _model_value(item, depth + 1)
            if reason:
                return f"key {key!r} {reason}"
        return None
    if isinstance(value, list):
        if len(value) > _MAX_LIST:
            return f"is a list of {len(value)} items, over the limit of {_MAX_LIST}"
        for i, item in enumerate(value):
            reason = _model_value(item, depth + 1)
            if reason:
                return f"item {i} {reason}"
        return None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -MAX_MODEL_INT <= value <= MAX_MODEL_INT else \
            f"is {value}, outside -{MAX_MODEL_INT}..{MAX_MODEL_INT} (a model keyword holds a width, a count or a size)"
    if isinstance(value, float):
        return None if math.isfinite(value) and abs(value) <= 1e6 else f"is {value}, not a finite number up to 1e6"
    if isinstance(value, str):
        return None if len(value) <= _MAX_STRING else f"is a string of {len(value)} characters"
    return f"must be a number, string, boolean, or a list or object of them, got {_show(value)}"


def check_weights_fit(model: str, kwargs: dict, shapes: dict[str, tuple[int, ...]], weights: str | Path,
                      config: str | Path) -> None:
    """Build the model on the meta device (no memory) and compare its weights' names and shapes with those of the
    weights file (`shapes`, from its header): CheckpointError when they differ, before any weight is allocated.
    Buffers the model creates empty and sizes when it is fitted are compared by name only."""
    from aeflow.models import create_model

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in create_model(model, **kwargs).state_dict().items()}
    except ConfigError as error:
        raise ConfigError(f"{config}: model_config: {error}") from None
    except Exception as exc:  # noqa: BLE001 - a constructor refusing its arguments (ValueError, TypeError, ...)
        raise ConfigError(f"{config}: model_config does not build a {model!r} model "
                          f"({type(exc).__name__}: {exc})") from None
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    # An empty buffer is a placeholder that fit() sizes (PaDiM's statistics, PatchCore's memory bank).
    other = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k] and math.prod(expected[k]) > 0)
    if not (missing or extra or other):
        return
    parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
             f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
             f"{len(other)} of another shape (e.g. {other[0]}: {shapes[other[0]]} in the file, {expected[other[0]]} "
             f"in the config)" if other else ""]
    raise CheckpointError(f"{weights}: weights do not fit the model in {Path(config).name}: "
                          f"{'; '.join(p for p in parts if p)}")
