"""Named training set-ups, all in one place: a preset is a partial `TrainConfig` (see `aeflow.training.run`).

- `paper`: AE-FLOW exactly as the guide (section 2) reads the paper: Wide-ResNet-50-2 encoder (frozen: the
  paper does not say; frozen is the cheaper reading), 8 flow steps with the "resnet" coupling network, the
  512/256/64 decoder, alpha 0.5, beta 0.9 with the paper's raw score blend, Adam lr 2e-3, weight decay 1e-5, 100 epochs, 256 px;
  every aeflow departure switched off by name, and the checkpoint with the lowest validation loss.
- `paper_chest_xray`: the paper's chest X-ray variant: "conv" coupling network (FastFlow style), lr 1e-3.
- `chest_xray`: the chest X-ray variant with aeflow's measured defaults (`_MEASURED`, docs/aeflow.md): per-image
  feature normalisation, flows on the stride-8 and -16 features, the memory reference of z' (image score
  and map), the score blend and the checkpoint chosen on validation, early stopping after 10 epochs without a
  better validation criterion; the paper's 512/256/64 decoder (as it was measured; the model's default is now
  128/64/32).
- `quick`: minutes on a laptop CPU (the demo): the measured defaults with EfficientNet-Lite0, whose real ImageNet
  weights ship in a pip package, at 128 px, 10 epochs, and the narrow decoder (128/64/32 channels, the model's
  default): the paper's 512/256/64 decoder is 12x its FLOPs (docs/results/ablation_decoder.md) and took most of the time.
"""

from __future__ import annotations

from aeflow.errors import ConfigError

_PAPER_MODEL = {
    "backbone": "wide_resnet50_2",
    "freeze_encoder": True,
    "flow_steps": 8,
    "subnet": "resnet",
    "decoder_widths": [512, 256, 64],
    "alpha": 0.5,
    "beta": 0.9,
    "score_mode": "paper",
    # Named so that a change of the model's defaults never reaches the paper presets: one flow on the stride-16
    # features, standardised per channel (the paper says nothing; this keeps the likelihood that of z), the
    # transposed-convolution decoder, the residual map.
    "feature_norm": "channel",
    "stages": [16],
    "decoder": "transposed",
    "map_mode": "residual",
    "reference": "none",
}

# aeflow's measured defaults (the model's own defaults, named so that presets stay what they were measured as):
# docs/results/ablation_*.md.
_MEASURED = {"feature_norm": "image", "score_mode": "validated", "stages": [8, 16], "decoder": "transposed",
             "reference": "memory", "memory_ratio": 0.1, "map_mode": "position"}

PRESETS: dict[str, dict] = {
    "paper": {
        "model": "aeflow",
        "model_kwargs": _PAPER_MODEL,
        "lr": 2e-3,
        "weight_decay": 1e-5,
        "max_epochs": 100,
        "patience": None,
        "image_size": 256,
        "select_on": "val_loss",  # the paper describes no model selection: the loss of normals, ~ the last epoch
    },
    "paper_chest_xray": {
        "model": "aeflow",
        "model_kwargs": {**_PAPER_MODEL, "subnet": "conv"},
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "max_epochs": 100,
        "patience": None,
        "image_size": 256,
        "select_on": "val_loss",
    },
    "chest_xray": {
        "model": "aeflow",
        "model_kwargs": {**_PAPER_MODEL, "subnet": "conv", **_MEASURED},
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "max_epochs": 100,
        "patience": 10,
        "image_size": 256,
    },
    "quick": {
        "model": "aeflow",
        "model_kwargs": {**_PAPER_MODEL, "backbone": "efficientnet_lite0", "subnet": "conv", **_MEASURED,
                         "decoder_widths": [128, 64, 32]},
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "max_epochs": 10,
        "patience": None,
        "image_size": 128,
    },
}


def preset(name: str) -> dict:
    """A copy of preset `name` (a dict of TrainConfig fields) to update and pass to `TrainConfig`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    chosen = PRESETS[name]
    return {**chosen, "model_kwargs": dict(chosen["model_kwargs"]), "preset": name}
