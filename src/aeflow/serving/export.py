"""Export a trained run to ONNX, with its pre-processing and score calibration inside, and score with onnxruntime.

The ONNX graph's contract:
    input  "image":       float32 B x C x H x W, values in [0, 1], H x W = the run's image_size, C = its channels
    output "pred_score":  float32 B      (higher = more anomalous; anomalous iff > the threshold in the metadata)
    output "anomaly_map": float32 B x H x W
The batch size is free. Decoding a file and mapping its intensities to [0, 1] (the run's intensity rule), and
resizing to H x W, happen *outside* the graph (they depend on the file format); everything after that is inside:
the backbone's input normalisation (grayscale to RGB, ImageNet or Lite mean/std), the model, and the score
calibration buffers (the standardisation statistics of normal validation images). The graph's metadata holds
the run's image size, channels, intensity rule, model name and the threshold with its rule.

The trace is aeflow.backends.onnx_bytes (torch's TorchScript-based exporter, with pytorch_msssim's SSIM swapped for
a traceable twin), the one the fast inference path uses too; the traced graph of AE-FLOW (FrEIA's AllInOneBlock,
SSIM, Gaussian smoothing) runs in onnxruntime within 1e-5 of PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aeflow.backends import PARITY_TOLERANCE, onnx_bytes, smooth_images
from aeflow.errors import AeflowError, ConfigError
from aeflow.serving.runtime import LoadedRun

OUTPUTS = ("pred_score", "anomaly_map")


class ExportError(AeflowError):
    """The model cannot be exported, or the exported graph does not reproduce PyTorch's results."""


class _ScoringGraph(nn.Module):
    """What the ONNX graph computes: images in [0, 1] -> (pred_score, anomaly_map)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.predict(image)
        return out["pred_score"], out["anomaly_map"]


def export_onnx(run_dir: str | Path, out_path: str | Path | None = None, *, opset: int = 17,
                run: LoadedRun | None = None) -> Path:
    """Write the run's model as ONNX (default: run_dir/model.onnx) and check it against PyTorch.

    Raises ExportError when tracing fails or when onnxruntime's scores or maps differ from PyTorch's by more
    than PARITY_TOLERANCE (relative to the largest PyTorch value) on a few test inputs.
    """
    import onnx

    run = run or LoadedRun(run_dir)
    out_path = Path(out_path) if out_path is not None else run.run_dir / "model.onnx"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    graph = _ScoringGraph(run.model).eval()
    shape = (run.channels, run.image_size, run.image_size)
    try:
        document = onnx.load_from_string(onnx_bytes(graph, shape, list(OUTPUTS), opset=opset))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        raise ExportError(f"cannot export {run.model_name} to ONNX: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    metadata = {
        "aeflow_model": run.model_name,
        "image_size": str(run.image_size),
        "channels": str(run.channels),
        "intensity": run.intensity,
        "threshold": repr(run.threshold.value),
        "threshold_rule": run.threshold.rule,
        "model_config": json.dumps(run.config.get("model_config", {})),
    }
    for key, value in metadata.items():
        document.metadata_props.add(key=key, value=value)
    onnx.save(document, str(out_path))
    check_parity(graph, OnnxScorer(out_path), shape)
    return out_path


def check_parity(graph: nn.Module, scorer: OnnxScorer, shape: tuple[int, int, int]) -> float:
    """Largest relative difference (max |onnx - torch| / max |torch|, per output) over a batch of one and a batch
    of three random smooth images (aeflow.backends.smooth_images says why smooth); raises ExportError above
    PARITY_TOLERANCE."""
    worst, where = 0.0, ""
    for images in (smooth_images(1, 9, shape), smooth_images(3, 25, shape)):
        with torch.no_grad():
            expected = dict(zip(OUTPUTS, (t.numpy() for t in graph(images))))
        got = scorer.predict(images.numpy())
        for name in OUTPUTS:
            scale = max(float(np.abs(expected[name]).max()), 1e-6)
            error = float(np.abs(got[name] - expected[name]).max())
            if error / scale > worst:
                worst = error / scale
                where = f"{name}: |difference| {error:.3g} where PyTorch's values reach {scale:.3g}"
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(f"the ONNX graph differs from PyTorch by {worst:.3g} (relative), more than "
                          f"{PARITY_TOLERANCE:g} ({where}): do not use {scorer.path}")
    return worst


class OnnxScorer:
    """Score images with an exported graph through onnxruntime (no torch needed at run time).

    predict(images) takes float32 N x C x H x W (or N x H x W for single-channel models) in [0, 1] at the size in
    the graph's metadata, and returns {"pred_score": N, "anomaly_map": N x H x W, "pred_label": N} (labels by
    the threshold in the metadata: anomalous iff score > threshold).
    """

    def __init__(self, path: str | Path):
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"ONNX file {self.path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"{self.path}: cannot be loaded by onnxruntime ({exc})") from exc
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.image_size = int(self.metadata.get("image_size", 0)) or None
        self.channels = int(self.metadata.get("channels", 0)) or None
        self.threshold = float(self.metadata["threshold"]) if "threshold" in self.metadata else None

    def predict(self, images) -> dict[str, np.ndarray]:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 3 and self.channels == 1:
            x = x[:, None]
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or (self.image_size is not None and x.shape[1:] != expected):
            raise ConfigError(f"images must be N x {' x '.join(map(str, expected))} (resize them first), "
                              f"got {tuple(x.shape)}")
        score, anomaly_map = self.session.run(list(OUTPUTS), {"image": np.ascontiguousarray(x)})
        out = {"pred_score": score, "anomaly_map": anomaly_map}
        if self.threshold is not None:
            out["pred_label"] = (score.astype(np.float64) > self.threshold).astype(np.int64)
        return out
