"""How a trained model's `predict` runs at inference time: eagerly, in channels-last memory format, or as an ONNX
graph in onnxruntime; with `backend="auto"` the fastest of them on this machine, measured, among those whose
outputs agree with eager PyTorch.

`make_predictor(model, (C, H, W))` returns a `Predictor`: called with a batch B x C x H x W it returns the same
dict of tensors as `model.predict` (score, anomaly map, score components, reconstruction), and its `report`
says which backend runs, why, and what each candidate measured. `predict_dataset` (so `aeflow test` and the
estimator), `aeflow predict` and `aeflow serve` build one; `backend="eager"` keeps plain PyTorch.

The choice, for backend="auto":
1. Every candidate is built: "eager" (model.predict under inference mode), "channels_last" (a copy of the model
   with its 4-D weights in NHWC order, fed NHWC images; on CPU oneDNN's convolutions prefer it) and, on CPU with
   onnxruntime installed, "onnxruntime" (the model's predict traced to ONNX, every output of predict kept, the
   batch size free; run with as many intra-op threads as torch uses).
2. Parity: each candidate's outputs on a batch of one, a batch of three and a batch of the caller's batch size of
   smooth random images must be within PARITY_TOLERANCE of eager's, relative to the largest eager value of each
   output (`parity_error`). A candidate that cannot be built, fails or differs is dropped, and the report says
   why. (A traced graph freezes the model's Python control flow at the traced batch: e.g. a memory bank searched
   in chunks of queries runs one chunk whatever the batch, which only a batch of the size used shows.)
3. Speed: every surviving candidate scores the same batch (`timing_batch` images, the caller's batch size up to
   16) once to warm up and `TIMING_ROUNDS` times, interleaved; the best round counts. The fastest wins if it beats
   eager by more than SPEEDUP_MARGIN (a smaller lead is within the noise of a shared machine); otherwise eager.
4. At run time, should the chosen backend still fail on a batch (a batch larger than any checked), that batch and
   every later one run eagerly, with a warning, and the report records it (`fell_back`): no prediction is lost.

Building, checking and timing cost seconds (all three candidates for a trained AE-FLOW, EfficientNet-Lite0 at 64 px,
the memory reference: 4.9 s at batch size 3, 5.5 s at 32 with its parity probe, on one thread of a 2-core AMD
EPYC; `make_predictor(load_run("runs/<run>")[0], (1, 64, 64), batch_size=...)` timed), once per loaded model:
worth it for a test split or a server, not for one image (`--backend eager`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aeflow.errors import ConfigError

BACKENDS = ("auto", "eager", "channels_last", "onnxruntime")
#: Largest difference from eager PyTorch accepted, relative to the largest eager value of each output.
PARITY_TOLERANCE = 1e-4
#: A candidate replaces eager only when it is this much faster (1.05 = 5 %).
SPEEDUP_MARGIN = 1.05
TIMING_ROUNDS = 3
MAX_TIMING_BATCH = 16


@dataclass
class Predictor:
    """`model.predict` through one backend; `report` records the choice (JSON-ready)."""

    name: str
    run: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    report: dict = field(default_factory=dict)
    fallback: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fallback is None:
            return self.run(images)
        try:
            return self.run(images)
        except Exception as exc:  # noqa: BLE001 - eager gives the same outputs (parity), or raises the model's error
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            warnings.warn(f"backend {self.name!r} failed on a batch of {len(images)} ({reason}); running eagerly "
                          "from now on", RuntimeWarning, stacklevel=2)
            self.report["fell_back"] = {"to": "eager", "batch": len(images), "error": reason}
            self.run, self.fallback = self.fallback, None
            return self.run(images)


def make_predictor(model: nn.Module, shape: tuple[int, int, int], *, backend: str = "auto",
                   batch_size: int = 32, device: str | torch.device = "cpu") -> Predictor:
    """A Predictor for `model` on images of `shape` (C, H, W): the named backend, or the measured best ("auto").

    A backend named explicitly must build and pass the parity check, else ConfigError says why; "auto" falls
    back to eager when nothing else qualifies.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    model = model.to(device).eval()
    eager = Predictor("eager", _eager(model))
    if backend == "eager":
        eager.report = {"backend": "eager", "reason": "asked for"}
        return eager
    on_cpu = torch.device(device).type == "cpu"
    names = [backend] if backend != "auto" else ["channels_last"] + (["onnxruntime"] if on_cpu else [])
    probes = [smooth_images(1, 9, shape), smooth_images(3, 25, shape)]
    if batch_size > 3:
        probes.append(smooth_images(batch_size, 9, shape, seed=2))
    try:
        expected = [{k: v.float().cpu() for k, v in eager(p.to(device)).items()} for p in probes]
    except Exception as exc:  # noqa: BLE001 - the model's own error is raised again, unchanged, when it is used
        if backend != "auto":
            raise
        eager.report = {"backend": "eager", "reason": f"eager predict failed on test images ({type(exc).__name__})"}
        return eager
    candidates, report = {"eager": eager}, {"candidates": {"eager": {}}}
    for name in names:
        entry = report["candidates"].setdefault(name, {})
        try:
            if name == "onnxruntime" and not on_cpu:
                raise ConfigError("onnxruntime runs here on CPU only")
            candidate = Predictor(name, _BUILDERS[name](model, shape, list(expected[0]), device))
            error = max(parity_error(exp, _host(candidate(p.to(device)))) for p, exp in zip(probes, expected))
        except Exception as exc:  # noqa: BLE001 - any failure to build or run means "not this backend"
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if backend != "auto":
                raise ConfigError(f"backend {name!r} cannot run this model: {entry['error']}") from exc
            continue
        entry["parity"] = error
        if not error <= PARITY_TOLERANCE:
            entry["error"] = f"outputs differ from eager by {error:.3g} (relative), more than {PARITY_TOLERANCE:g}"
            if backend != "auto":
                raise ConfigError(f"backend {name!r}: {entry['error']}")
            continue
        candidates[name] = candidate
    if backend != "auto":
        chosen = candidates[backend]
        chosen.report = {"backend": backend, "reason": "asked for", **report}
        return chosen
    batch = timing_batch(batch_size)
    images = smooth_images(batch, 9, shape).to(device)
    speed = _images_per_second(candidates, images)
    for name in [n for n in candidates if n not in speed]:
        report["candidates"][name]["error"] = "failed while timed"
        candidates.pop(name)
    for name, value in speed.items():
        report["candidates"][name]["images_per_second"] = value
    best = max(speed, key=speed.get)
    if best != "eager" and speed[best] < SPEEDUP_MARGIN * speed["eager"]:
        best, reason = "eager", f"no backend beat eager by {SPEEDUP_MARGIN - 1:.0%} at batch {batch}"
    else:
        reason = f"fastest at batch {batch}" + (f": {speed[best] / speed['eager']:.2f}x eager" if best != "eager"
                                                else "")
    chosen = candidates[best]
    chosen.report = {"backend": best, "reason": reason, "timing_batch": batch, **report}
    if best != "eager":
        chosen.fallback = eager.run
    return chosen


def timing_batch(batch_size: int) -> int:
    return max(1, min(batch_size, MAX_TIMING_BATCH))


def parity_error(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """max over outputs of max |got - expected| / max |expected|; inf when an output is missing or misshapen."""
    worst = 0.0
    for key, want in expected.items():
        have = got.get(key)
        if have is None or tuple(have.shape) != tuple(want.shape):
            return float("inf")
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-6)
        worst = max(worst, float((have.float() - want.float()).abs().max()) / scale if want.numel() else 0.0)
    return worst


def summary(report: dict) -> str:
    """One line for a console: the backend, its reason, and each candidate's speed or why it was dropped."""
    parts = []
    for name, entry in report.get("candidates", {}).items():
        if "images_per_second" in entry:
            parts.append(f"{name} {entry['images_per_second']:.1f} img/s")
        elif "error" in entry:
            parts.append(f"{name} not used ({entry['error']})")
    return f"inference backend: {report.get('backend')} ({report.get('reason')})" + (
        f"; {', '.join(parts)}" if parts else "")


# --- the backends -----------------------------------------------------------------------------------------------


def _eager(model: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return model.predict(images)

    return run


def _channels_last(model: nn.Module, shape, keys, device) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = twin.predict(images.contiguous(memory_format=torch.channels_last))
        return {k: v.contiguous() for k, v in out.items()}

    return run


def _onnxruntime(model: nn.Module, shape, keys, device) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    import onnxruntime

    graph = onnx_bytes(_Outputs(model, keys), shape, keys)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: a candidate that fails is reported in the choice, not on stderr
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return {k: torch.from_numpy(v) for k, v in zip(keys, session.run(keys, {"image": x}))}

    return run


_BUILDERS = {"channels_last": _channels_last, "onnxruntime": _onnxruntime}


class _Outputs(nn.Module):
    """model.predict as a module returning a tuple, in `keys` order (what the ONNX tracer needs)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.predict(image)
        return tuple(out[k] for k in self.keys)


def onnx_bytes(module: nn.Module, shape: tuple[int, int, int], output_names: list[str], *,
               opset: int = 17) -> bytes:
    """`module` (images B x C x H x W -> one tensor per name, batch first) traced to ONNX, the batch size free.

    torch's TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs the `onnxscript`
    package, which aeflow does not depend on.
    """
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    batch = {0: "batch"}
    buffer = io.BytesIO()
    with traceable_ssim(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter warnings: the parity check decides
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=output_names,
                          dynamic_axes={"image": batch, **{name: batch for name in output_names}})
    return buffer.getvalue()


@contextlib.contextmanager
def traceable_ssim():
    """Swap pytorch_msssim's `ssim` for the same computation written so that the tracer can export it.

    `pytorch_msssim.ssim` builds its Gaussian window with `repeat(X.shape[1], ...)` and squeezes trailing
    dimensions; traced with a free batch size, the window's shape becomes unknown (the exporter cannot emit the
    convolution) and the squeezes become ONNX `If` nodes that onnxruntime rejects. The stand-in calls the
    library's own `_ssim` with a window whose channel count is a constant: the same numbers for 4-D images.
    It is swapped only where aeflow modules imported `ssim`, and only while exporting.
    """
    import pytorch_msssim
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    def ssim(X, Y, data_range=255, size_average=True, win_size=11, win_sigma=1.5, win=None, K=(0.01, 0.03),
             nonnegative_ssim=False):
        if win is None:
            win = _fspecial_gauss_1d(win_size, win_sigma).repeat(int(X.shape[1]), 1, 1, 1)
        per_channel, _ = _ssim(X, Y, data_range=data_range, win=win, size_average=False, K=K)
        if nonnegative_ssim:
            per_channel = torch.relu(per_channel)
        return per_channel.mean() if size_average else per_channel.mean(1)

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("aeflow.") and getattr(m, "ssim", None) is pytorch_msssim.ssim]
    for module in patched:
        module.ssim = ssim
    try:
        yield
    finally:
        for module in patched:
            module.ssim = pytorch_msssim.ssim


# --- measuring ----------------------------------------------------------------------------------------------------


def smooth_images(batch: int, width: int, shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    """Locally averaged uniform noise in [0, 1], like real scans rather than white noise.

    White noise through a deep network with random weights drives activations far beyond anything an image
    produces, and there float32 rounding alone reaches the parity tolerance (measured on AE-FLOW with a random
    Wide-ResNet-50-2 at 256 px: PyTorch float32 vs float64 3.8e-5, onnxruntime vs float64 7.5e-5), which would
    hide what the check is for: a backend that computes something else.
    """
    noise = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed + batch + width))
    width = min(width, 2 * (min(shape[-2:]) // 2) - 1) if min(shape[-2:]) > 1 else 1
    return torch.nn.functional.avg_pool2d(noise, width, stride=1, padding=width // 2, count_include_pad=False)




def _images_per_second(candidates: dict[str, Predictor], images: torch.Tensor) -> dict[str, float]:
    """Images per second of each candidate (eager always); one that fails is left out."""
    working = {}
    for name, predictor in candidates.items():  # warm-up: first-call allocations, oneDNN kernel selection
        try:
            predictor(images)
        except Exception:  # noqa: BLE001 - not this backend; eager's own failure is raised
            if name == "eager":
                raise
            continue
        working[name] = predictor
    candidates = working
    best = {name: float("inf") for name in candidates}
    for _ in range(TIMING_ROUNDS):  # interleaved, so a burst of load on a shared machine hits all alike
        for name, predictor in candidates.items():
            start = time.perf_counter()
            predictor(images)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(images) / max(seconds, 1e-9) for name, seconds in best.items()}


def _host(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().cpu() for k, v in out.items()}
