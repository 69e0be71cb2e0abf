"""A scikit-learn / PyOD-style wrapper: any aeflow model in three lines.

    detector = AnomalyDetector("aeflow", backbone="efficientnet_lite0", epochs=10).fit(X_normal)
    scores = detector.decision_function(X_new)     # higher = more anomalous
    labels = detector.predict(X_new)               # 1 = anomalous (score > detector.threshold_)
    proba = detector.predict_proba(X_new)          # N x 2: [P(normal), P(anomalous)], see below
    result = detector.detect(X_new)                # pred_score, pred_label, anomaly_map, pred_mask (anomalib's names)

X is an array N x H x W or N x C x H x W (C = 1 or 3, channels first; N x H x W x C with channels_last=True), a
list of such images (2-D or 3-D arrays, sizes may differ: each is resized to `image_size`), or a list of image
paths. Arrays go through aeflow.data exactly as files do (they are stored as temporary .npz files for the data
layer to read) and are resized to `image_size` (default: the side of square arrays of one size, if a multiple of
16; else 256).

Intensity: each image is mapped to [0, 1] by the `intensity` rule of aeflow.data.intensity, and the rule is FIXED
AT FIT (`intensity_`), so the same pixels score the same whatever their array type. For arrays "auto" becomes, at
fit, "dtype" when X holds integers and "minmax" (each image stretched from its own minimum to maximum) when X holds
floats. Under "dtype" and "unit" an image is taken at full scale: integer arrays are divided by their type's range
and float arrays must already be in [0, 1], so uint8 pixels and the same pixels / 255 as floats score the same.
"minmax" and "percentile" do not depend on the type at all; "window:C,W" is in the array's own units. For files
"auto" is resolved per file from its format, as `aeflow train` does (8/16-bit PNG/TIFF -> dtype, DICOM -> its
window, NIfTI -> percentile:1,99).

How `fit` uses X: a seeded `validation_fraction` of the normal images (all of X without y; the y == 0 images with
y) is held out. The model is trained by `aeflow.training.train` (lightning, the same loop as `aeflow train`) on
the rest; the held-out images give the validation loss, the model's score calibration and the threshold. With
`contamination` set, the threshold is instead the PyOD one: the (1 - contamination) quantile of
`decision_scores_`. Labelled anomalies (y == 1) are never trained on; they join the held-out set, where the
labelled rules ("f1", "sensitivity:0.95") need them. `verbose=False` (the default) prints nothing.

Threshold rules use the vocabulary of `aeflow test --threshold-rule` (aeflow.evaluation.thresholds.make_rule):
"fpr:0.05" = "conformal_fpr:0.05" = "conformal_fpr(alpha=0.05)", "f1" = "f1_optimal", "sensitivity:0.95" =
"target_sensitivity:0.95".

`predict_proba` is calibrated by rank among the held-out normal images (`calibration_scores_`): P(anomalous) =
1 - p, where p = (1 + #{held-out normal scores >= s}) / (n + 1) is the split-conformal p-value of score s. For a
new normal image P(anomalous) >= 1 - alpha happens with probability at most alpha, and with the "fpr:ALPHA" rule
an image is flagged exactly when P(anomalous) >= 1 - ALPHA. It is a rank, not a posterior: it says how unusual an
image is among normals, not how likely it is to be diseased.

`detect` adds the pixel level: anomaly_map (N x S x S at the model's input side S) and pred_mask = anomaly_map >
`pixel_threshold_`, chosen at fit from the held-out normal images' maps: the conformal threshold (the rule's alpha,
else 0.05) on their per-image maximum, so that at most that share of normal images gets any pixel marked.

Fitted attributes (PyOD names): decision_scores_ (scores of X as given to fit, in order), threshold_,
labels_ (0/1 of X), threshold_rule_ (the rule that chose threshold_), model_ (the trained AnomalyModel),
intensity_ (the rule fixed at fit), calibration_scores_, pixel_threshold_.
`save(folder)` writes a run folder in the training format (config.json, model.safetensors, threshold.json) plus
estimator.json, so `aeflow predict / export / serve --run folder` work on it too; `load(folder)` reads it back
without unpickling anything.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aeflow.data import DataSplits, ImageDataset, Record, SplitRecords
from aeflow.data.intensity import parse_intensity
from aeflow.errors import ConfigError
from aeflow.evaluation.thresholds import ConformalFPR, Threshold, ThresholdRule, conformal_p_values, make_rule
from aeflow.backends import BACKENDS, make_predictor
from aeflow.inference import predict_dataset
from aeflow.models import available_models

ESTIMATOR_FILE = "estimator.json"
#: Rules under which an image is taken at full scale: integers / their type's range, floats already in [0, 1].
_FULL_SCALE = ("dtype", "unit")


def parse_threshold_rule(text: str) -> ThresholdRule:
    """The rule for a threshold_rule string, in the vocabulary `aeflow test --threshold-rule` takes (make_rule)."""
    return make_rule(text)


class AnomalyDetector:
    """Unsupervised (or semi-supervised with y) anomaly detector around a registered aeflow model.

    model: registry name ("aeflow", ...); model_kwargs go to its constructor (e.g. backbone="efficientnet_lite0").
    contamination: expected fraction of anomalies in X, in (0, 0.5]; sets threshold_ from the training scores
        (PyOD); None uses `threshold_rule` on the held-out images instead.
    threshold_rule: "fpr:ALPHA" (at most a fraction ALPHA of normal images flagged), "f1", "sensitivity:T"
        (or their long names, see the module docstring).
    epochs, batch_size, lr: training. image_size: side the images are resized to (None: see module docstring).
    channels: 1 (colour converted to gray) or 3; None takes C from arrays, 1 for paths.
    channels_last: arrays are N x H x W x C (list items H x W x C) instead of channels first.
    validation_fraction: share of the normal images held out of training (see module docstring).
    intensity: how pixel values become [0, 1] (aeflow.data.intensity), fixed at fit. seed: the split and training.
    verbose: False prints nothing; True shows lightning's progress bar and one line per epoch.
    backend: how the fitted model scores (aeflow.backends): "auto" (measured once per fitted or loaded model),
        "eager", "channels_last" or "onnxruntime".
    """

    def __init__(self, model: str = "aeflow", contamination: float | None = None, threshold_rule: str = "fpr:0.05",
                 *, epochs: int = 10, batch_size: int = 16, lr: float = 1e-3, image_size: int | None = None,
                 channels: int | None = None, channels_last: bool = False, validation_fraction: float = 0.2,
                 intensity: str = "auto", seed: int = 0, verbose: bool = False, backend: str = "auto",
                 **model_kwargs):
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
        for name, value in (("channels_last", channels_last), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._rule = parse_threshold_rule(threshold_rule)
        parse_intensity(intensity)
        self.model, self.contamination, self.threshold_rule = model, contamination, threshold_rule
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.image_size, self.channels, self.channels_last = image_size, channels, channels_last
        self.validation_fraction, self.intensity, self.seed = validation_fraction, intensity, seed
        self.verbose, self.backend = verbose, backend
        self.model_kwargs = model_kwargs
        self._predictor = None  # the fitted model's predict through `backend`, built at the first scoring

    # --- scikit-learn protocol --------------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        return {"model": self.model, "contamination": self.contamination, "threshold_rule": self.threshold_rule,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "image_size": self.image_size,
                "channels": self.channels, "channels_last": self.channels_last,
                "validation_fraction": self.validation_fraction, "intensity": self.intensity, "seed": self.seed,
                "verbose": self.verbose, "backend": self.backend, **self.model_kwargs}

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
            images = _sources(X, Path(tmp), channels_last=self.channels_last)
            sources = images.sources
            self.channels_ = self.channels or images.channels or 1
            self.image_size_ = self.image_size or images.side or 256
            self.intensity_ = self._fixed_intensity(images.kind)
            self.fitted_on_ = "arrays" if images.kind else "files"
            labels = np.zeros(len(sources), np.int64) if y is None else np.asarray(y)
            if labels.shape != (len(sources),) or not np.isin(labels, (0, 1)).all():
                raise ConfigError(f"y must hold one 0 (normal) or 1 (anomalous) per image of X ({len(sources)})")
            train_idx, val_idx = self._split(labels)
            intensity = self._intensity_for(images)
            records = [Record(source, int(label)) for source, label in zip(sources, labels)]
            splits = DataSplits.from_records(
                SplitRecords(train=[records[i] for i in train_idx], val=[records[i] for i in val_idx], test=[],
                             layout="arrays" if images.kind else "files", root=tmp, seed=self.seed),
                image_size=self.image_size_, channels=self.channels_, intensity=intensity)
            config = TrainConfig.from_dict({
                "model": self.model, "model_kwargs": {**self.model_kwargs, "in_channels": self.channels_},
                "data": {"intensity": intensity}, "image_size": self.image_size_, "channels": self.channels_,
                "seed": self.seed, "batch_size": self.batch_size, "lr": self.lr, "max_epochs": self.epochs,
                "progress_bar": self.verbose, "accelerator": "cpu", "devices": 1,
            })
            with _quiet(not self.verbose):
                train(config, Path(tmp) / "run", data=splits)
            self.model_, self.run_config_ = load_run(Path(tmp) / "run")
            self._predictor = None
            self.decision_scores_ = self._score_sources(sources, intensity)
            calibration = [sources[i] for i in val_idx if labels[i] == 0]
            normal_maps = self._predict_sources(calibration, intensity, keep_maps=True).anomaly_map
        self.calibration_scores_ = np.sort(self.decision_scores_[val_idx][labels[val_idx] == 0])
        alpha = self._rule.alpha if isinstance(self._rule, ConformalFPR) else 0.05
        self.pixel_threshold_ = float(ConformalFPR(alpha).fit(normal_maps.reshape(len(normal_maps), -1)
                                                                .max(axis=1)).value)
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
            images = _sources(X, Path(tmp), channels_last=self.channels_last)
            return self._score_sources(images.sources, self._intensity_for(images))

    def predict(self, X) -> np.ndarray:
        """1 for images scored above threshold_ (anomalous), else 0."""
        return self.predict_from_scores(self.decision_function(X))

    def predict_from_scores(self, scores) -> np.ndarray:
        self._check_fitted()
        return self.threshold.predict(scores)

    def predict_proba(self, X) -> np.ndarray:
        """N x 2: [P(normal), P(anomalous)], calibrated by rank among the held-out normal images (module docstring)."""
        return self.proba_from_scores(self.decision_function(X))

    def proba_from_scores(self, scores) -> np.ndarray:
        self._check_fitted()
        self._check_calibrated("predict_proba")
        anomalous = 1.0 - conformal_p_values(self.calibration_scores_, scores)
        return np.stack([1.0 - anomalous, anomalous], axis=1)

    def detect(self, X) -> Detections:
        """Scores, labels, anomaly maps and masks of X (anomalib's field names; see the module docstring)."""
        self._check_fitted()
        self._check_calibrated("detect")
        with tempfile.TemporaryDirectory(prefix="aeflow-score-") as tmp:
            images = _sources(X, Path(tmp), channels_last=self.channels_last)
            out = self._predict_sources(images.sources, self._intensity_for(images), keep_maps=True)
        scores = out.pred_score.astype(np.float64)
        return Detections(pred_score=scores, pred_label=self.predict_from_scores(scores),
                          anomaly_map=out.anomaly_map, pred_mask=out.anomaly_map > self.pixel_threshold_,
                          threshold=self.threshold_, pixel_threshold=self.pixel_threshold_)

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
        state = {"params": self.get_params(), "decision_scores": self.decision_scores_.tolist(),
                 "intensity": self.intensity_, "fitted_on": self.fitted_on_}
        if hasattr(self, "calibration_scores_"):
            state.update(calibration_scores=self.calibration_scores_.tolist(), pixel_threshold=self.pixel_threshold_)
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
            detector = cls(**state["params"])
            detector.decision_scores_ = np.asarray(state["decision_scores"], dtype=np.float64)
            # a folder saved before the rule was fixed at fit keeps the rule as given (auto follows the dtype)
            detector.intensity_ = str(parse_intensity(state.get("intensity", detector.intensity)))
            detector.fitted_on_ = state.get("fitted_on", "arrays")
            if "calibration_scores" in state:
                detector.calibration_scores_ = np.asarray(state["calibration_scores"], dtype=np.float64)
                detector.pixel_threshold_ = float(state["pixel_threshold"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{folder}: not a saved AnomalyDetector ({ESTIMATOR_FILE}: {exc!r})") from exc
        detector.model_, detector.run_config_ = load_run(folder)
        detector.channels_ = detector.run_config_["train"]["channels"]
        detector.image_size_ = detector.run_config_["train"]["image_size"]
        detector._set_threshold(read_threshold(folder))
        detector.labels_ = detector.predict_from_scores(detector.decision_scores_)
        return detector

    # --- internals -------------------------------------------------------------------------------------------

    def _fixed_intensity(self, kind: str | None) -> str:
        """The rule fixed at fit: "auto" resolved for arrays by their kind ("int" or "float"); as given otherwise."""
        if self.intensity == "auto" and kind is not None:
            return "dtype" if kind == "int" else "minmax"
        return str(parse_intensity(self.intensity))

    def _intensity_for(self, images: _Images) -> str:
        """The rule to read these images with, so that the same pixels map to the same [0, 1] values."""
        rule = self.intensity_
        if rule not in _FULL_SCALE:
            return rule
        if images.kind is None:  # files: integer images by their type's range, float images as they are
            return "auto" if self.fitted_on_ == "arrays" else rule
        if images.kind == "float" and not (0 <= images.value_range[0] and images.value_range[1] <= 1):
            raise ConfigError(f"X holds floats in {images.value_range[0]:g}..{images.value_range[1]:g}, but this "
                              f"detector was fitted with intensity rule {rule!r} (full scale: integer images / "
                              f"their type's range, float images already in the unit range [0, 1]); scale them "
                              f"to [0, 1] as at fit, or fit with intensity='minmax'")
        return "dtype" if images.kind == "int" else "unit"

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

    def _check_calibrated(self, what: str) -> None:
        if not hasattr(self, "calibration_scores_"):
            raise ConfigError(f"{what} needs the held-out normals' scores, which this detector's folder (saved by an "
                              f"older aeflow) lacks: fit it again")

    def _predict_sources(self, sources: list[str], intensity: str, *, keep_maps: bool):
        dataset = ImageDataset([Record(s, -1) for s in sources], image_size=self.image_size_,
                               channels=self.channels_, intensity=intensity)
        if self._predictor is None:  # built once per fitted or loaded model (aeflow.backends)
            self._predictor = make_predictor(self.model_, (self.channels_, self.image_size_, self.image_size_),
                                             backend=self.backend, batch_size=self.batch_size)
        return predict_dataset(self.model_, dataset, batch_size=self.batch_size, keep_maps=keep_maps,
                               predictor=self._predictor)

    def _score_sources(self, sources: list[str], intensity: str) -> np.ndarray:
        return self._predict_sources(sources, intensity, keep_maps=False).pred_score.astype(np.float64)


@dataclass
class Detections:
    """What `AnomalyDetector.detect` returns, with anomalib's field names."""

    pred_score: np.ndarray  # N, higher = more anomalous
    pred_label: np.ndarray  # N, 1 = anomalous (pred_score > threshold)
    anomaly_map: np.ndarray  # N x S x S, at the model's input side S
    pred_mask: np.ndarray  # N x S x S, bool: anomaly_map > pixel_threshold
    threshold: float
    pixel_threshold: float


@dataclass
class _Images:
    sources: list[str]
    kind: str | None  # "int" or "float" for arrays, None for files
    channels: int | None  # C of arrays; None for files
    side: int | None  # the side of square arrays of one size, if a multiple of 16
    value_range: tuple[float, float] | None = None  # lowest and highest pixel of arrays


def _sources(X, folder: Path, *, channels_last: bool = False) -> _Images:
    """What aeflow.data can read for X. A list of paths is taken as is; an array N x [C x] H x W, or a list of
    arrays [C x] H x W (sizes may differ), is written to folder/X<k>.npz (one file per image size) in the MedMNIST
    layout the npz reader reads (channels last)."""
    if isinstance(X, (list, tuple)) and X and all(isinstance(p, (str, Path)) for p in X):
        return _Images([str(p) for p in X], None, None, None)
    shape = "N x H x W x C" if channels_last else "N x C x H x W"
    if isinstance(X, (list, tuple)):
        if not X:
            raise ConfigError("X is empty: give at least one image")
        images = [np.asarray(x) for x in X]
        if any(image.ndim not in (2, 3) for image in images):
            bad = next(i for i, image in enumerate(images) if image.ndim not in (2, 3))
            raise ConfigError(f"X[{bad}] has shape {images[bad].shape}: each image of a list must be H x W or "
                              f"{shape[4:]}")
    else:
        array = np.asarray(X)
        if array.ndim not in (3, 4) or len(array) == 0:
            raise ConfigError(f"X must be a list of image paths or images, or an array N x H x W or {shape} with "
                              f"C = 1 or 3, got shape {array.shape}")
        images = list(array)
    # every image as C x H x W
    images = [image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0) if channels_last else image
              for image in images]
    channels = {image.shape[0] for image in images}
    if not channels <= {1, 3} or len(channels) > 1:
        hint = "" if channels_last else "; pass channels_last=True for H x W x C images"
        raise ConfigError(f"X must hold images {shape[4:]} with C = 1 or 3, the same for all "
                          f"(channels {'last' if channels_last else 'first'}), got C = {sorted(channels)}{hint}")
    kinds = set()
    for image in images:
        if image.dtype == bool or np.issubdtype(image.dtype, np.integer):
            kinds.add("int")
        elif np.issubdtype(image.dtype, np.floating):
            kinds.add("float")
        else:
            raise ConfigError(f"X must hold numbers, got dtype {image.dtype}")
    if len(kinds) > 1:
        raise ConfigError("X mixes integer and float images, which the intensity rule would map differently: "
                          "convert them to one type first")
    (c,) = channels
    sizes = list(dict.fromkeys(image.shape[1:] for image in images))
    sources: list[str | None] = [None] * len(images)
    for k, size in enumerate(sizes):
        index = [i for i, image in enumerate(images) if image.shape[1:] == size]
        stack = np.stack([images[i] for i in index])
        path = folder / f"X{k}.npz"
        np.savez(path, train_images=stack[:, 0] if c == 1 else np.moveaxis(stack, 1, 3))
        for j, i in enumerate(index):
            sources[i] = f"{path}#split=train,index={j}"
    side = sizes[0][0] if len(sizes) == 1 and sizes[0][0] == sizes[0][1] and sizes[0][0] % 16 == 0 else None
    value_range = (min(float(np.min(image)) for image in images), max(float(np.max(image)) for image in images))
    return _Images(sources, kinds.pop(), c, side, value_range)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Nothing on the terminal from lightning or aeflow's log while fitting (log files still get their records)."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning", "aeflow")]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
            logger.propagate = False
        try:
            yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers, logger.propagate = handlers, propagate
