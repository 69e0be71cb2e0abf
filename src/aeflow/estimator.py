"""A scikit-learn / PyOD-style wrapper: any aeflow model in three lines.

    detector = AnomalyDetector("aeflow", backbone="efficientnet_lite0", epochs=10).fit(X_normal)
    scores = detector.decision_function(X_new)     # higher = more anomalous
    labels = detector.predict(X_new)               # 1 = anomalous (score > detector.threshold_)

X is an array N x H x W or N x C x H x W (C = 1 or 3, channels first), or a list of image paths. Both go through
aeflow.data exactly as files do (an array is stored as a temporary .npz for the data layer to read): each image
is mapped to [0, 1] by the `intensity` rule of aeflow.data.intensity ("auto" divides integer images by their
type's range and stretches float images from their own minimum to maximum; pass intensity="unit" for floats
already in [0, 1]) and resized to `image_size` (default: the side of square arrays, if a multiple of 16; else 256).

How `fit` uses X: a seeded `validation_fraction` of the normal images (all of X without y; the y == 0 images with
y) is held out. The model is trained by `aeflow.training.train` (lightning, the same loop as `aeflow train`) on
the rest; the held-out images give the validation loss, the model's score calibration and the threshold. With
`contamination` set, the threshold is instead the PyOD one: the (1 - contamination) quantile of
`decision_scores_`. Labelled anomalies (y == 1) are never trained on; they join the held-out set, where the
labelled rules ("f1", "sensitivity:0.95") need them.

Fitted attributes (PyOD names): decision_scores_ (scores of X as given to fit, in order), threshold_,
labels_ (0/1 of X), threshold_rule_ (the rule that chose threshold_), model_ (the trained AnomalyModel).
`save(folder)` writes a run folder in the training format (config.json, model.safetensors, threshold.json) plus
estimator.json, so `aeflow predict / export / serve --run folder` work on it too; `load(folder)` reads it back
without unpickling anything.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

from aeflow.data import DataSplits, ImageDataset, Record, SplitRecords
from aeflow.data.intensity import parse_intensity
from aeflow.errors import ConfigError
from aeflow.evaluation.thresholds import Threshold, ThresholdRule, make_rule
from aeflow.inference import predict_dataset
from aeflow.models import available_models

ESTIMATOR_FILE = "estimator.json"
_RULE_ALIASES = {"fpr": ("conformal_fpr", "alpha"), "conformal_fpr": ("conformal_fpr", "alpha"),
                 "f1": ("f1_optimal", None), "f1_optimal": ("f1_optimal", None),
                 "sensitivity": ("target_sensitivity", "target"),
                 "target_sensitivity": ("target_sensitivity", "target")}


def parse_threshold_rule(text: str) -> ThresholdRule:
    """'fpr:0.05' (conformal, normal images only), 'f1' or 'sensitivity:0.95' (need labelled anomalies)."""
    name, _, value = str(text).partition(":")
    if name not in _RULE_ALIASES:
        raise ConfigError(f"threshold_rule {text!r}: use 'fpr:ALPHA' (e.g. fpr:0.05), 'f1' or 'sensitivity:TARGET'")
    rule, param = _RULE_ALIASES[name]
    if param is None and value:
        raise ConfigError(f"threshold_rule {text!r}: '{name}' takes no parameter")
    try:
        params = {param: float(value)} if param and value else {}
    except ValueError:
        raise ConfigError(f"threshold_rule {text!r}: the parameter must be a number") from None
    return make_rule(rule, **params)


class AnomalyDetector:
    """Unsupervised (or semi-supervised with y) anomaly detector around a registered aeflow model.

    model: registry name ("aeflow", ...); model_kwargs go to its constructor (e.g. backbone="efficientnet_lite0").
    contamination: expected fraction of anomalies in X, in (0, 0.5]; sets threshold_ from the training scores
        (PyOD); None uses `threshold_rule` on the held-out images instead.
    threshold_rule: "fpr:ALPHA" (at most a fraction ALPHA of normal images flagged), "f1", "sensitivity:T".
    epochs, batch_size, lr: training. image_size: side the images are resized to (None: see module docstring).
    channels: 1 (colour converted to gray) or 3; None takes C from arrays, 1 for paths.
    validation_fraction: share of the normal images held out of training (see module docstring).
    intensity: how pixel values become [0, 1] (aeflow.data.intensity). seed: the split and the training.
    """

    def __init__(self, model: str = "aeflow", contamination: float | None = None, threshold_rule: str = "fpr:0.05",
                 *, epochs: int = 10, batch_size: int = 16, lr: float = 1e-3, image_size: int | None = None,
                 channels: int | None = None, validation_fraction: float = 0.2, intensity: str = "auto",
                 seed: int = 0, **model_kwargs):
        if model not in available_models():
            raise ConfigError(f"unknown model {model!r}; available: {', '.join(available_models())}")
        if contamination is not None and not (isinstance(contamination, (int, float)) and 0 < contamination <= 0.5):
            raise ConfigError(f"contamination must be in (0, 0.5] or None, got {contamination!r}")
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 16 or image_size % 16):
            raise ConfigError(f"image_size must be a multiple of 16 (or None), got {image_size!r}")
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or None, got {channels!r}")
        if not (isinstance(validation_fraction, float) and 0 < validation_fraction < 1):
            raise ConfigError(f"validation_fraction must be a float in (0, 1), got {validation_fraction!r}")
        self._rule = parse_threshold_rule(threshold_rule)
        parse_intensity(intensity)
        self.model, self.contamination, self.threshold_rule = model, contamination, threshold_rule
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.image_size, self.channels = image_size, channels
        self.validation_fraction, self.intensity, self.seed = validation_fraction, intensity, seed
        self.model_kwargs = model_kwargs

    # --- scikit-learn protocol --------------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        return {"model": self.model, "contamination": self.contamination, "threshold_rule": self.threshold_rule,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "image_size": self.image_size,
                "channels": self.channels, "validation_fraction": self.validation_fraction,
                "intensity": self.intensity, "seed": self.seed, **self.model_kwargs}

    def set_params(self, **params) -> AnomalyDetector:
        self.__init__(**{**self.get_params(), **params})
        return self

    def __repr__(self) -> str:
        return f"AnomalyDetector({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # --- fit / score -----------------------------------------------------------------------------------------

    def fit(self, X, y=None) -> AnomalyDetector:
        """Train on the normal images of X (all of X without y) and choose threshold_ (see module docstring)."""
        from aeflow.training import TrainConfig, load_run, train

        with tempfile.TemporaryDirectory(prefix="aeflow-fit-") as tmp:
            sources, channels, side = _sources(X, Path(tmp))
            self.channels_ = self.channels or channels or 1
            self.image_size_ = self.image_size or side or 256
            labels = np.zeros(len(sources), np.int64) if y is None else np.asarray(y)
            if labels.shape != (len(sources),) or not np.isin(labels, (0, 1)).all():
                raise ConfigError(f"y must hold one 0 (normal) or 1 (anomalous) per image of X ({len(sources)})")
            train_idx, val_idx = self._split(labels)
            records = [Record(source, int(label)) for source, label in zip(sources, labels)]
            splits = DataSplits.from_records(
                SplitRecords(train=[records[i] for i in train_idx], val=[records[i] for i in val_idx], test=[],
                             layout="arrays" if channels else "files", root=tmp, seed=self.seed),
                image_size=self.image_size_, channels=self.channels_, intensity=self.intensity)
            config = TrainConfig.from_dict({
                "model": self.model, "model_kwargs": {**self.model_kwargs, "in_channels": self.channels_},
                "data": {"intensity": self.intensity}, "image_size": self.image_size_, "channels": self.channels_,
                "seed": self.seed, "batch_size": self.batch_size, "lr": self.lr, "max_epochs": self.epochs,
                "progress_bar": False, "accelerator": "cpu", "devices": 1,
            })
            train(config, Path(tmp) / "run", data=splits)
            self.model_, self.run_config_ = load_run(Path(tmp) / "run")
            self.decision_scores_ = self._score_sources(sources)
        if self.contamination is not None:
            value = float(np.quantile(self.decision_scores_, 1 - self.contamination))
            threshold = Threshold(value=value, rule=f"contamination({self.contamination})", fitted_on="",
                                  n_fit=len(sources))
        else:
            threshold = self._rule.fit(self.decision_scores_[val_idx], labels[val_idx])
            if "warning" in dict(threshold.details):
                warnings.warn(f"threshold_rule {self.threshold_rule!r}: {dict(threshold.details)['warning']}; "
                              "give more normal images, a larger validation_fraction or a larger alpha",
                              stacklevel=2)
        self._set_threshold(threshold)
        self.labels_ = self.predict_from_scores(self.decision_scores_)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score of every image of X (N,), higher = more anomalous."""
        self._check_fitted()
        with tempfile.TemporaryDirectory(prefix="aeflow-score-") as tmp:
            sources, _, _ = _sources(X, Path(tmp))
            return self._score_sources(sources)

    def predict(self, X) -> np.ndarray:
        """1 for images scored above threshold_ (anomalous), else 0."""
        return self.predict_from_scores(self.decision_function(X))

    def predict_from_scores(self, scores) -> np.ndarray:
        self._check_fitted()
        return self.threshold.predict(scores)

    # --- persistence -----------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write a run folder (config.json, model.safetensors, threshold.json) plus estimator.json."""
        from aeflow.evaluation.thresholds import THRESHOLD_FILE
        from aeflow.training import save_checkpoint
        from aeflow.training.run import CONFIG_FILE, MODEL_FILE

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"model": self.model_.name, "config": self.model_.config(),
                         "state_dict": self.model_.state_dict()}, folder / MODEL_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.run_config_, indent=2, default=str))
        (folder / THRESHOLD_FILE).write_text(json.dumps(self.threshold.to_dict(), indent=2))
        state = {"params": self.get_params(), "decision_scores": self.decision_scores_.tolist()}
        (folder / ESTIMATOR_FILE).write_text(json.dumps(state))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AnomalyDetector:
        """Read a folder written by `save` (weights from safetensors; nothing is unpickled)."""
        from aeflow.serving.runtime import read_threshold
        from aeflow.training import load_run

        folder = Path(folder)
        try:
            state = json.loads((folder / ESTIMATOR_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder}: not a saved AnomalyDetector ({ESTIMATOR_FILE}: {exc})") from exc
        detector = cls(**state["params"])
        detector.model_, detector.run_config_ = load_run(folder)
        detector.channels_ = detector.run_config_["train"]["channels"]
        detector.image_size_ = detector.run_config_["train"]["image_size"]
        detector.decision_scores_ = np.asarray(state["decision_scores"], dtype=np.float64)
        detector._set_threshold(read_threshold(folder))
        detector.labels_ = detector.predict_from_scores(detector.decision_scores_)
        return detector

    # --- internals -------------------------------------------------------------------------------------------

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices): a seeded share of the normals held out, plus every anomaly."""
        normal = np.flatnonzero(labels == 0)
        order = np.random.default_rng(self.seed).permutation(normal)
        n_val = max(2, round(self.validation_fraction * len(normal)))
        if len(normal) - n_val < 2:
            raise ConfigError(f"fit needs at least {n_val + 2} normal images ({n_val} held out for validation, "
                              f"2 to train on); X holds {len(normal)}")
        return np.sort(order[n_val:]), np.sort(np.concatenate([order[:n_val], np.flatnonzero(labels == 1)]))

    def _set_threshold(self, threshold: Threshold) -> None:
        self.threshold = threshold
        self.threshold_ = threshold.value
        self.threshold_rule_ = threshold.rule

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("this AnomalyDetector is not fitted yet: call fit(X) first")

    def _score_sources(self, sources: list[str]) -> np.ndarray:
        dataset = ImageDataset([Record(s, -1) for s in sources], image_size=self.image_size_,
                               channels=self.channels_, intensity=self.intensity)
        scores = predict_dataset(self.model_, dataset, batch_size=self.batch_size, keep_maps=False).pred_score
        return scores.astype(np.float64)


def _sources(X, folder: Path) -> tuple[list[str], int | None, int | None]:
    """(sources aeflow.data can read, channels, side) for X. A list of paths is taken as is (channels and side
    None); an array N x [C x] H x W is written to folder/X.npz in the MedMNIST layout the npz reader reads
    (channels last), and its C and, for square images, its side are returned."""
    if isinstance(X, (list, tuple)) and X and all(isinstance(p, (str, Path)) for p in X):
        return [str(p) for p in X], None, None
    array = np.asarray(X)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] not in (1, 3) or len(array) == 0:
        raise ConfigError(f"X must be a list of image paths, or an array N x H x W or N x C x H x W with C = 1 or "
                          f"3 (channels first), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ConfigError(f"X must hold numbers, got dtype {array.dtype}")
    channels, (height, width) = array.shape[1], array.shape[2:]
    np.savez(folder / "X.npz", train_images=array[:, 0] if channels == 1 else np.moveaxis(array, 1, 3))
    sources = [f"{folder / 'X.npz'}#split=train,index={i}" for i in range(len(array))]
    return sources, channels, height if height == width and height % 16 == 0 else None
