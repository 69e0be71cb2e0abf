"""Options for `aeflow train` from a file: `--config run.yaml` and `--from runs/<name>`.

A file holds either
- `aeflow train` flags, named without `--` and with `_` for `-` (epochs: 10, image_size: 64, data: medmnist,
  option: {size: 64}, model_option: {flow_steps: 4}); `option` and `model_option` may also be lists of
  "key=value" strings, as on the command line; or
- a training config (TrainConfig's fields: max_epochs, model_kwargs, data: {layout: ...}, ...) under `train:`,
  which is what a run's config.json holds and what `aeflow train` prints at its start.

YAML (.yaml / .yml) or JSON (anything else). Flags given on the command line override the file: a flag wins over
the file's value of that flag, and, for a training config, over the fields that flag sets (FLAG_FIELDS).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aeflow.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
#: `aeflow train` flag -> the TrainConfig field it sets (a dotted path into data / model_kwargs).
FLAG_FIELDS = {
    "model": "model", "preset": "preset", "image_size": "image_size", "channels": "channels", "epochs": "max_epochs",
    "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay", "patience": "patience", "seed": "seed",
    "precision": "precision", "accelerator": "accelerator", "devices": "devices", "strategy": "strategy",
    "num_nodes": "num_nodes", "labelled_anomalies": "labelled_anomalies", "logger": "logger",
    "data": "data.layout", "root": "data.root", "skip_bad": "data.skip_bad", "intensity": "data.intensity",
    "backbone": "model_kwargs.backbone", "weights": "model_kwargs.weights",
    "freeze_encoder": "model_kwargs.freeze_encoder", "subnet": "model_kwargs.subnet",
}
#: Flags that repeat (key=value each): a file may give them as a mapping.
LIST_FLAGS = {"option": "data", "model_option": "model_kwargs"}
_TRAIN_CONFIG_KEYS = {"model_kwargs", "max_epochs", "select_on", "num_workers", "progress_bar"}


@dataclass
class StoredOptions:
    """What a file held: flags (`flags`) or a training config (`train`), one of them."""

    flags: dict[str, Any] | None = None
    train: dict[str, Any] | None = None

    def with_overrides(self, values: dict, explicit: set[str]) -> dict:
        """The stored training config with the fields set by the `explicit` flags taken from `values` (the
        TrainConfig dict the command line's flags make)."""
        merged = copy.deepcopy(self.train)
        for flag in explicit:
            if flag in FLAG_FIELDS:
                path = FLAG_FIELDS[flag].split(".")
                value = _get(values, path, default=0 if flag == "labelled_anomalies" else None)
                if value is not None or len(path) == 1:
                    _set(merged, path, value)
            elif flag in LIST_FLAGS:
                named = {f.split(".")[1] for f in FLAG_FIELDS.values() if f.startswith(LIST_FLAGS[flag] + ".")}
                for key, value in values.get(LIST_FLAGS[flag], {}).items():
                    if key not in named:
                        _set(merged, [LIST_FLAGS[flag], key], value)
        return merged


def read_options(path: str | Path) -> StoredOptions:
    """Read a --config file or a run's config.json; ConfigError naming the file for anything unreadable."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES} bytes, too large for a config file")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(text)
        else:
            document = json.loads(text)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (for --from, give a run folder holding config.json)") from None
    except Exception as exc:  # yaml's and json's errors, decoding, permissions
        raise ConfigError(f"{path}: cannot read it as {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                          f"({type(exc).__name__}: {exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(document).__name__}")
    if "train" in document:
        if not isinstance(document["train"], dict):
            raise ConfigError(f"{path}: `train` must be a mapping of training options")
        return StoredOptions(train=document["train"])
    if _TRAIN_CONFIG_KEYS & set(document) or isinstance(document.get("data"), dict):
        return StoredOptions(train=document)
    return StoredOptions(flags={key.replace("-", "_"): value for key, value in document.items()})


def merge_options(params: dict, file_flags: dict, explicit: set[str]) -> dict:
    """The flags to use: the command line's where given (`explicit`), else the file's, else the defaults.
    Repeated key=value flags add up: the file's first, then the command line's (which win on a repeated key)."""
    merged = dict(params)
    for name, value in file_flags.items():
        if name in LIST_FLAGS:
            pairs = [f"{k}={json.dumps(v)}" for k, v in value.items()] if isinstance(value, dict) else list(value)
            merged[name] = pairs + (list(params.get(name) or []) if name in explicit else [])
        elif name not in explicit:
            merged[name] = value
    return merged


def _get(document: dict, path: list[str], default=None):
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return default
        document = document[key]
    return document


def _set(document: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        document = document.setdefault(key, {})
    document[path[-1]] = value
