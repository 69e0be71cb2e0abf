"""Score a large archive on a Ray cluster: `aeflow predict --engine ray [--address ...] [--workers N]`.

The driver (the `aeflow predict` process) lists the inputs as `predict_paths` does, makes them a Ray dataset whose
rows are the local engine's batches (the positions and sources of `batch_size` consecutive images), and maps it
over a pool of `workers` model replicas (`map_batches` with the callable class `_Scorer`: each replica loads the
run once). One row per batch, rather than one per image left to Ray to batch, keeps every forward pass over the
same images as the local engine's: float32 results depend slightly on what else is in the batch, and a score of
magnitude 1000 printed with 8 digits shows a difference of 1e-4. A replica decodes its batch's files, scores them and
renders the overlays with the same code as the local engine (aeflow.serving.predict.decode / score_items); the
rows and overlay PNGs come back to the driver, which writes predictions.csv, skipped.csv and overlays/ exactly as
the local engine does, in the same order (Ray Data keeps the order here), flushed batch by batch.

What the cluster needs: aeflow (with the `aeflow[distributed]` extra, i.e. ray) installed on every node, and the
run folder and the input files readable at the same paths from every node (a shared file system); the outputs
are written by the driver only. With no `address`, a local Ray instance is started for the call and shut down
after it; with one (or a Ray session already open in this process), the cluster is used and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from aeflow.errors import ConfigError
from aeflow.serving.predict import Outcome, decode, score_items
from aeflow.serving.runtime import LoadedRun

_FIELDS = ("position", "path", "slice", "pred_score", "pred_label", "overlay", "png", "reason")


class _Scorer:
    """One model replica: loads the run once, then scores rows of {"positions", "sources"} (one batch each)."""

    def __init__(self, run_dir: str, device: str, threshold_rule: str | None, overlays: bool, backend: str,
                 batch_size: int):
        self.run = LoadedRun(run_dir, device=device, threshold_rule=threshold_rule, backend=backend,
                             batch_size=batch_size)
        self.overlays = overlays

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for positions, sources in zip(rows["positions"], rows["sources"]):
            dataset = self.run.dataset([str(source) for source in sources])
            items = [(int(position), decode(dataset, i)) for i, position in enumerate(positions)]
            outcomes += score_items(self.run, items, self.overlays)
        columns = {name: [getattr(o, name) for o in outcomes] for name in _FIELDS}
        return {name: np.array(values, dtype=object if name == "png" else None)
                for name, values in columns.items()}


def scored_batches(run_dir: str | Path, items: Sequence[tuple[int, str]], *, batch_size: int, overlays: bool,
                   device: str = "cpu", threshold_rule: str | None = None, address: str | None = None,
                   backend: str = "auto",
                   workers: int | None = None, progress: bool = False) -> Iterator[list[Outcome]]:
    """Outcomes of `items` ((global position, source) each), batch by batch, scored by `workers` replicas (default:
    one per CPU of the cluster; one GPU each with device "cuda")."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        # Ray reports usage statistics over the network unless told not to; aeflow runs offline.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 **({"num_cpus": workers} if address is None and workers else {}))
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order, context.enable_progress_bars
    try:
        if not items:
            return
        context.execution_options.preserve_order = True  # rows are written in input order
        context.enable_progress_bars = progress
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
        dataset = ray.data.from_items([{"positions": [p for p, _ in chunk], "sources": [s for _, s in chunk]}
                                       for chunk in chunks])
        scored = dataset.map_batches(
            _Scorer, fn_constructor_kwargs={"run_dir": str(Path(run_dir).resolve()), "device": device,
                                            "threshold_rule": threshold_rule, "overlays": overlays,
                                            "backend": backend, "batch_size": batch_size},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
            num_gpus=1 if device.startswith("cuda") else 0, batch_format="numpy")
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            yield [Outcome(**{name: _plain(batch[name][i]) for name in _FIELDS}) for i in range(len(batch["position"]))]
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = before  # the caller's session
        if started:
            ray.shutdown()


def _plain(value):
    """numpy scalars as Python values (the CSV writer formats them as the local engine's)."""
    return value.item() if isinstance(value, np.generic) else value


def require_ray():
    """The ray module; ConfigError saying how to install it when it (or Ray Data) is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'aeflow[distributed]'") from None
    return ray
