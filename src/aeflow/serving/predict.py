"""Score new scans with a trained run: files, folders, DICOM series and multi-frame files, NIfTI volumes.

Writes into `out_dir`:
    predictions.csv   one row per 2-D image: path, slice, pred_score, pred_label, threshold, threshold_rule, overlay
    skipped.csv       path, reason for every file that could not be read (not fatal with skip_bad=True)
    overlays/*.png    the image in gray with its anomaly map in colour, score and verdict written on it

Rows are appended and flushed after every batch, so an interrupted run keeps everything scored so far.
Earlier results are never replaced silently: `out_dir` must be new (or empty) unless `overwrite=True`, which
first removes the earlier predictions, skipped lists and overlays. Every input ends up in predictions.csv or in
skipped.csv with its reason; when no image at all could be scored the call raises DataError (after writing
skipped.csv), so the command exits non-zero.
A large archive can be split over several processes or machines with `shard=(i, n)`: shard i scores every n-th
image (positions i, i + n, ...) and writes predictions.i-of-n.csv and skipped.i-of-n.csv into the same folder
(overlay names carry the image's global position, so shards never collide).

Two engines score: "local" (this process; two threads decode ahead of the model) and "ray" (a pool of model
replicas on a Ray cluster, aeflow.serving.ray_engine). Both go through the same per-image code: `decode` reads
one source, `score_items` turns decoded images into `Outcome`s (row values and overlay PNG), and `_Results`
writes them, so the files are the same whichever engine scored.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from aeflow.data import Sample, scan_inputs
from aeflow.data.readers import split_source
from aeflow.errors import BadFileError, ConfigError, DataError
from aeflow.serving.runtime import LoadedRun, png_bytes, read_threshold, render_overlay

COLUMNS = ("path", "slice", "pred_score", "pred_label", "threshold", "threshold_rule", "overlay")
# Files decoded ahead of the model, per batch: enough to keep the model busy, bounded in memory.
_DECODE_AHEAD_BATCHES = 4


def predict_paths(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    skip_bad: bool = True,
    overlays: bool = True,
    axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    device: str = "cpu",
    run: LoadedRun | None = None,
    overwrite: bool = False,
    threshold_rule: str | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    backend: str = "auto",
) -> Path:
    """Score every 2-D image in `inputs` with the run in `run_dir`; returns the path of predictions.csv.

    inputs: image files (PNG/JPEG/TIFF 8/16-bit, DICOM, NIfTI), folders (searched recursively for readable
        files, so a folder of .dcm slices scores each slice), or sources naming one image ('scan.nii.gz#axis=2,
        slice=40', 'cine.dcm#frame=3'). Multi-frame DICOMs give one row per frame, NIfTI volumes one per slice
        along `axis` (only slices in [start, stop) with `slice_range`).
    skip_bad: list unreadable files in skipped.csv and go on; False stops at the first one (BadFileError),
        keeping the rows written before it.
    shard: (i, n) to score only every n-th image starting at i (see module docstring).
    device: where the model runs ("cpu", "cuda").
    run: an already loaded run (saves loading it again); `run_dir`, `device` and `threshold_rule` are then ignored.
    overwrite: replace the results already in `out_dir` (this shard's, with `shard`); without it a folder that
        holds results is refused before anything is scored.
    threshold_rule: score with the threshold fitted for this rule (thresholds.json) instead of threshold.json's.
    engine: "local", or "ray" to score on a Ray cluster (`address`; a local Ray instance when None) with
        `workers` model replicas (aeflow.serving.ray_engine; needs the `aeflow[distributed]` extra).
    backend: how the model scores (aeflow.backends; "auto" measures the candidates once, at `batch_size`); with
        the local engine the choice and its measurements go to inference_backend.json in `out_dir` (per shard).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not inputs:
        raise ConfigError("nothing to predict: give at least one file or folder")
    index, count = shard or (0, 1)
    if not 0 <= index < count:
        raise ConfigError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    suffix = f".{index}-of-{count}" if shard else ""
    _claim_folder(out_dir, suffix, (index, count) if shard else None, overwrite)  # before the model is loaded
    if engine == "ray":  # the model is loaded by the workers; ray and the threshold here first, to fail fast
        from aeflow.serving.ray_engine import require_ray

        require_ray()
        run_dir = run.run_dir if run is not None else run_dir
        threshold = read_threshold(run_dir, threshold_rule)
    else:
        run = run or LoadedRun(run_dir, device=device, threshold_rule=threshold_rule, backend=backend,
                               batch_size=batch_size)
        threshold = run.threshold
    records, skipped_at_scan = scan_inputs(inputs, axis=axis, slice_range=slice_range, skip_bad=skip_bad)
    positions = range(index, len(records), count)
    sources = [records[i].source for i in positions]
    predictions_path = out_dir / f"predictions{suffix}.csv"

    with _Results(out_dir, suffix, threshold, skip_bad) as results, _progress(progress) as bar:
        if index == 0:  # files that could not even be listed belong to no shard: the first one reports them
            results.skip(skipped_at_scan)
        task = bar.add_task("scoring", total=len(sources))
        if engine == "ray":
            from aeflow.serving.ray_engine import scored_batches

            batches = scored_batches(run_dir, list(zip(positions, sources)), batch_size=batch_size,
                                     overlays=overlays, device=device, threshold_rule=threshold_rule,
                                     address=address, workers=workers, progress=progress, backend=backend)
        else:
            if sources:
                (out_dir / f"inference_backend{suffix}.json").write_text(json.dumps(run.predictor.report, indent=2))
            batches = _local_batches(run, sources, positions, batch_size, overlays)
        with contextlib.closing(batches):  # a stop (strict, Ctrl-C) ends the engine's work too
            for outcomes in batches:
                results.add(outcomes)
                bar.advance(task, len(outcomes))
        scored = results.scored
    if not scored and (positions or not shard):
        skipped_path = out_dir / f"skipped{suffix}.csv"
        raise DataError(f"nothing could be scored: every input was unreadable (see {skipped_path})")
    return predictions_path


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Outcome:
    """What became of one image: its row (score, verdict, overlay file name and PNG) or why it was skipped."""

    position: int
    path: str
    slice: str = ""
    pred_score: float = float("nan")
    pred_label: int = -1
    overlay: str = ""  # file name under overlays/, "" without one
    png: bytes = b""
    reason: str = ""  # non-empty: the file could not be read

    @property
    def skipped(self) -> bool:
        return bool(self.reason)


def decode(dataset, i: int) -> Sample | BadFileError:
    """Item `i` of an ImageDataset, or the BadFileError that names why it cannot be read."""
    try:
        return dataset[i]
    except BadFileError as error:
        return error


def score_items(run: LoadedRun, items: Sequence[tuple[int, Sample | BadFileError]], overlays: bool) -> list[Outcome]:
    """Score the decoded images of `items` ((global position, Sample or BadFileError)) in one forward pass: the
    scored ones first, in order, then the unreadable ones."""
    good = [(position, item) for position, item in items if isinstance(item, Sample)]
    results = run.score_samples([s for _, s in good]) if good else []
    outcomes = []
    for (position, sample), result in zip(good, results):
        path, fragment = split_source(sample.path)
        name, png = "", b""
        if overlays:
            name = f"{position:06d}_{_safe_name(Path(path).name, fragment)}.png"
            png = png_bytes(render_overlay(sample.image.numpy(), result.anomaly_map, result.pred_score,
                                           result.pred_label, run.threshold.value))
        outcomes.append(Outcome(position, path, ",".join(f"{k}={v}" for k, v in fragment.items()),
                                result.pred_score, result.pred_label, name, png))
    outcomes += [Outcome(position, item.path, reason=item.reason) for position, item in items
                 if isinstance(item, BadFileError)]
    return outcomes


class _Results:
    """predictions.csv, skipped.csv and overlays/ of one call (or shard), written and flushed batch by batch."""

    def __init__(self, out_dir: Path, suffix: str, threshold, skip_bad: bool):
        self.out_dir, self.threshold, self.skip_bad = out_dir, threshold, skip_bad
        self.overlay_dir = out_dir / "overlays"
        self.paths = (out_dir / f"predictions{suffix}.csv", out_dir / f"skipped{suffix}.csv")
        self.scored = 0

    def __enter__(self) -> _Results:
        self.overlay_dir.mkdir(parents=True, exist_ok=True)
        self.pred_file, self.skip_file = (open(path, "w", newline="") for path in self.paths)
        self.predictions, self.skipped = csv.writer(self.pred_file), csv.writer(self.skip_file)
        self.predictions.writerow(COLUMNS)
        self.skipped.writerow(("path", "reason"))
        self.skip_file.flush()
        return self

    def __exit__(self, *exc_info) -> None:
        self.pred_file.close()
        self.skip_file.close()

    def skip(self, rows: Iterable[tuple[str, str]]) -> None:
        self.skipped.writerows(rows)
        self.skip_file.flush()

    def add(self, outcomes: Sequence[Outcome]) -> None:
        """Write one batch: its rows (and overlays) first, then its unreadable files, which stop the call without
        skip_bad (after the batch's rows are written)."""
        value, rule = f"{self.threshold.value:.8g}", self.threshold.rule
        for outcome in outcomes:
            if outcome.skipped:
                continue
            overlay = ""
            if outcome.overlay:
                (self.overlay_dir / outcome.overlay).write_bytes(outcome.png)
                overlay = str(Path("overlays") / outcome.overlay)
            self.predictions.writerow((outcome.path, outcome.slice, f"{outcome.pred_score:.8g}", outcome.pred_label,
                                       value, rule, overlay))
            self.scored += 1
        self.pred_file.flush()
        for outcome in outcomes:
            if outcome.skipped:
                if not self.skip_bad:
                    raise BadFileError(outcome.path, outcome.reason)
                self.skipped.writerow((outcome.path, outcome.reason))
        self.skip_file.flush()


def _local_batches(run: LoadedRun, sources: list[str], positions: range, batch_size: int,
                   overlays: bool) -> Iterator[list[Outcome]]:
    dataset = run.dataset(sources)
    for batch in _decoded_batches(dataset, batch_size):
        yield score_items(run, [(positions[i], item) for i, item in batch], overlays)


def _claim_folder(out_dir: Path, suffix: str, shard: tuple[int, int] | None, overwrite: bool) -> None:
    """Make sure no earlier result is replaced without `overwrite`; with it, remove this call's earlier results.

    A shard owns predictions.I-of-N.csv, skipped.I-of-N.csv and the overlays of its positions (I, I + N, ...), so
    the shards of one archive share a folder; an unsharded call owns the whole folder.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    own = [out_dir / f"predictions{suffix}.csv", out_dir / f"skipped{suffix}.csv",
           out_dir / f"inference_backend{suffix}.json"]
    overlays = sorted((out_dir / "overlays").glob("*.png")) if (out_dir / "overlays").is_dir() else []
    if shard is not None:
        overlays = [p for p in overlays if p.name[:6].isdigit() and int(p.name[:6]) % shard[1] == shard[0]]
        earlier = [p for p in own if p.exists()] + overlays
    else:
        earlier = [p for p in out_dir.iterdir() if p.name != "overlays"] + overlays
    if not earlier:
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} already holds results ({', '.join(p.name for p in earlier[:3])}"
                          f"{', ...' if len(earlier) > 3 else ''}): choose a new --out folder, or pass --overwrite "
                          f"to replace them")
    for path in own + overlays:
        path.unlink(missing_ok=True)


def _decoded_batches(dataset, batch_size: int) -> Iterator[list[tuple[int, Sample | BadFileError]]]:
    """Batches of (index, Sample or its BadFileError), decoded by two threads while the model scores."""

    indices = iter(range(len(dataset)))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=2) as pool:
        while True:
            while len(pending) < batch_size * _DECODE_AHEAD_BATCHES and (i := next(indices, None)) is not None:
                pending.append((i, pool.submit(decode, dataset, i)))
            if not pending:
                return
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            yield [(i, future.result()) for i, future in batch]


def _safe_name(file_name: str, fragment: dict[str, str]) -> str:
    """A file-system-safe overlay name from the image's file name and slice/frame."""
    stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", file_name)
    suffix = "".join(f"_{k}{v}" for k, v in fragment.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem + suffix)[:120]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)
