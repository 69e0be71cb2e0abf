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
"""

from __future__ import annotations

import csv
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from aeflow.data import Sample, scan_inputs
from aeflow.data.readers import split_source
from aeflow.errors import BadFileError, ConfigError, DataError
from aeflow.serving.runtime import LoadedRun, render_overlay

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
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not inputs:
        raise ConfigError("nothing to predict: give at least one file or folder")
    index, count = shard or (0, 1)
    if not 0 <= index < count:
        raise ConfigError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    out_dir = Path(out_dir)
    suffix = f".{index}-of-{count}" if shard else ""
    _claim_folder(out_dir, suffix, (index, count) if shard else None, overwrite)  # before the model is loaded
    run = run or LoadedRun(run_dir, device=device, threshold_rule=threshold_rule)
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    records, skipped_at_scan = scan_inputs(inputs, axis=axis, slice_range=slice_range, skip_bad=skip_bad)
    positions = range(index, len(records), count)
    dataset = run.dataset([records[i].source for i in positions])
    predictions_path = out_dir / f"predictions{suffix}.csv"
    threshold = run.threshold
    scored = 0

    with open(predictions_path, "w", newline="") as pred_file, \
            open(out_dir / f"skipped{suffix}.csv", "w", newline="") as skip_file, _progress(progress) as bar:
        predictions, skipped = csv.writer(pred_file), csv.writer(skip_file)
        predictions.writerow(COLUMNS)
        skipped.writerow(("path", "reason"))
        if index == 0:  # files that could not even be listed belong to no shard: the first one reports them
            skipped.writerows(skipped_at_scan)
        skip_file.flush()
        task = bar.add_task("scoring", total=len(dataset))
        for batch in _decoded_batches(dataset, batch_size):
            good = [(i, item) for i, item in batch if isinstance(item, Sample)]
            results = run.score_samples([s for _, s in good]) if good else []
            scored += len(results)
            for (i, sample), result in zip(good, results):
                path, fragment = split_source(sample.path)
                overlay = ""
                if overlays:
                    name = overlay_dir / f"{positions[i]:06d}_{_safe_name(Path(path).name, fragment)}.png"
                    render_overlay(sample.image.numpy(), result.anomaly_map, result.pred_score, result.pred_label,
                                   threshold.value).save(name)
                    overlay = str(name.relative_to(out_dir))
                slice_ = ",".join(f"{k}={v}" for k, v in fragment.items())
                predictions.writerow((path, slice_, f"{result.pred_score:.8g}", result.pred_label,
                                      f"{threshold.value:.8g}", threshold.rule, overlay))
            pred_file.flush()
            for _, item in batch:
                if isinstance(item, BadFileError):
                    if not skip_bad:
                        raise item
                    skipped.writerow((item.path, item.reason))
            skip_file.flush()
            bar.advance(task, len(batch))
    if not scored and (positions or not shard):
        skipped_path = out_dir / f"skipped{suffix}.csv"
        raise DataError(f"nothing could be scored: every input was unreadable (see {skipped_path})")
    return predictions_path


def _claim_folder(out_dir: Path, suffix: str, shard: tuple[int, int] | None, overwrite: bool) -> None:
    """Make sure no earlier result is replaced without `overwrite`; with it, remove this call's earlier results.

    A shard owns predictions.I-of-N.csv, skipped.I-of-N.csv and the overlays of its positions (I, I + N, ...), so
    the shards of one archive share a folder; an unsharded call owns the whole folder.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    own = [out_dir / f"predictions{suffix}.csv", out_dir / f"skipped{suffix}.csv"]
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

    def decode(i: int) -> Sample | BadFileError:
        try:
            return dataset[i]
        except BadFileError as error:
            return error

    indices = iter(range(len(dataset)))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=2) as pool:
        while True:
            while len(pending) < batch_size * _DECODE_AHEAD_BATCHES and (i := next(indices, None)) is not None:
                pending.append((i, pool.submit(decode, i)))
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
