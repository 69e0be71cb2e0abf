"""A trained run, loaded once, ready to score images the way it was trained: shared by predict, export and serve.

`LoadedRun` holds the model (loaded safely by `aeflow.training.load_run`: safetensors, nothing unpickled), the
pre-processing the run was trained with (image size, channel count, intensity rule, all from config.json) and the
decision threshold fitted on validation data (threshold.json). Decoding goes through `aeflow.data.ImageDataset`,
so a file is read, scaled to [0, 1] and resized exactly as the training images were.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from aeflow.backends import BACKENDS, Predictor, make_predictor
from aeflow.data import ImageDataset, Record, Sample
from aeflow.errors import ConfigError
from aeflow.evaluation.thresholds import Threshold, threshold_in_use

#: Overlays are drawn at least this many pixels wide, so a 64 or 128 px model input is still readable.
OVERLAY_MIN_SIDE = 256


@dataclass(frozen=True)
class Scored:
    """One image's result: the score, the 0/1 verdict (score > threshold) and the anomaly map at model size."""

    pred_score: float
    pred_label: int
    anomaly_map: np.ndarray  # H x W float32


def read_threshold(run_dir: str | Path, rule: str | None = None) -> Threshold:
    """The threshold the run's predictions use: threshold.json, or with `rule` the one `aeflow test` fitted for
    that rule (see aeflow.evaluation.thresholds.threshold_in_use); ConfigError telling how to make one."""
    return threshold_in_use(run_dir, rule)


class LoadedRun:
    """A run folder's model, pre-processing and threshold. `score` is safe to call from several threads."""

    def __init__(self, run_dir: str | Path, *, device: str = "cpu", threshold_rule: str | None = None,
                 backend: str = "auto", batch_size: int = 16):
        from aeflow.training import load_run

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ConfigError(f"run folder {self.run_dir} does not exist")
        self.threshold = read_threshold(self.run_dir, threshold_rule)  # before the (slower) model load: fail fast
        self.model, self.config = load_run(self.run_dir, device=device)
        self.device = device
        train = self.config.get("train", {})
        try:
            self.model_name = str(train["model"])
            self.image_size = int(train["image_size"])
            self.channels = int(train["channels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{self.run_dir}/config.json lacks the training settings ({exc})") from exc
        self.intensity = str(train.get("data", {}).get("intensity", "auto"))
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend, self.batch_size = backend, batch_size
        self._predictor: Predictor | None = None
        # One forward pass at a time: torch already spreads each pass over all cores, and a module's
        # buffers are shared state, so concurrent passes would only contend.
        self._lock = threading.Lock()

    def dataset(self, sources: list[str], *, max_pixels: int | None = None) -> ImageDataset:
        """Samples of `sources` (paths, '#frame=..' / '#axis=..,slice=..' sources) pre-processed for this run."""
        extra = {} if max_pixels is None else {"max_pixels": max_pixels}
        return ImageDataset([Record(s, -1, "") for s in sources], image_size=self.image_size,
                            channels=self.channels, intensity=self.intensity, **extra)

    @property
    def predictor(self) -> Predictor:
        """The model's predict through the backend asked for (aeflow.backends; "auto": measured at the first use,
        at `batch_size`); `predictor.report` says which runs and why."""
        with self._lock:
            if self._predictor is None:
                self._predictor = make_predictor(self.model, (self.channels, self.image_size, self.image_size),
                                                 backend=self.backend, batch_size=self.batch_size,
                                                 device=self.device)
            return self._predictor

    def score(self, images: torch.Tensor) -> list[Scored]:
        """Score a batch B x C x H x W (values in [0, 1], the run's size)."""
        predictor = self.predictor
        with self._lock, torch.inference_mode():
            out = predictor(images.to(self.device))
            scores = out["pred_score"].float().cpu().numpy()
            maps = out["anomaly_map"].float().cpu().numpy()
        labels = self.threshold.predict(scores)
        return [Scored(float(s), int(y), m) for s, y, m in zip(scores, labels, maps)]

    def score_samples(self, samples: list[Sample]) -> list[Scored]:
        return self.score(torch.stack([s.image for s in samples]))

    def metadata(self) -> dict:
        """What a client needs to know about the model: name, input, threshold, training data."""
        model_config = self.config.get("model_config", {})
        train = self.config.get("train", {})
        return {
            "model": self.model_name,
            "backbone": model_config.get("backbone"),
            "image_size": self.image_size,
            "channels": self.channels,
            "intensity": self.intensity,
            "threshold": json_float(self.threshold.value),
            "threshold_rule": self.threshold.rule,
            "model_config": model_config,
            "training": {k: train.get(k) for k in ("data", "seed", "max_epochs", "preset") if k in train},
            "training_data": training_data_summary(self.run_dir),
            "inference_backend": self._predictor.report if self._predictor is not None else {"backend": self.backend},
        }


def training_data_summary(run_dir: Path) -> dict | None:
    """Layout and image counts per split from the run's splits.json, or None when the run has none or it is not
    a split list (a hand-edited file must not break GET /model)."""
    try:
        document = json.loads((run_dir / "splits.json").read_text())
        counts = {}
        for name, records in document.get("splits", {}).items():
            labels = [r.get("label") for r in records]
            counts[str(name)] = {"normal": labels.count(0), "anomalous": labels.count(1)}
        return {"layout": str(document.get("layout")), "seed": document.get("seed"), "counts": counts}
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def json_float(value: float) -> float | None:
    """JSON has no infinity or NaN: such a threshold (nothing is ever flagged) is sent as null."""
    return value if math.isfinite(value) else None


# --- overlays ----------------------------------------------------------------------------------------------------


def render_overlay(image: torch.Tensor | np.ndarray, anomaly_map: np.ndarray, score: float, label: int,
                   threshold: float) -> Image.Image:
    """The image in gray with the anomaly map as a translucent colour map, and the score written on it.

    The map's colours are scaled per image (its 1st to 99.5th percentile), so they show *where* the model sees
    the most anomaly in this image; *how much* is the score and the verdict in the caption.
    """
    from matplotlib import colormaps

    gray = np.asarray(image, dtype=np.float32)
    gray = gray.mean(0) if gray.ndim == 3 else gray  # C x H x W -> H x W
    lo, hi = np.percentile(anomaly_map, (1.0, 99.5))
    heat = np.clip((anomaly_map - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(anomaly_map)
    rgb_gray = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    colour = colormaps["jet"](heat)[..., :3]
    alpha = 0.45 * heat[..., None] + 0.1  # cool regions stay mostly gray
    blended = (1 - alpha) * rgb_gray + alpha * colour
    picture = Image.fromarray((blended * 255).round().astype(np.uint8), "RGB")
    side = max(picture.width, picture.height)
    if side < OVERLAY_MIN_SIDE:
        factor = math.ceil(OVERLAY_MIN_SIDE / side)
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BILINEAR)
    verdict = "ANOMALOUS" if label else "normal"
    caption = f"score {score:.4g}  (threshold {threshold:.4g})  {verdict}"
    draw = ImageDraw.Draw(picture)
    box = draw.textbbox((4, 4), caption)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 80, 80) if label else (120, 255, 120))
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(picture: Image.Image) -> str:
    return base64.b64encode(png_bytes(picture)).decode("ascii")
