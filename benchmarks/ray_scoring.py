"""Throughput of `aeflow predict` on an archive: the local engine against Ray Data with 1 and 2 model replicas.

    python benchmarks/ray_scoring.py --tiny-run [--images 192] [--size 256] [--workers 1,2] [--batch-size 16]
    python benchmarks/ray_scoring.py --run runs/<name> --images 500

Writes `--images` PNG phantoms (a tenth of them truncated, so the skipped path is exercised), then scores the
folder with the local engine and with `engine="ray"` for each worker count, in a local Ray instance started once
before the timings (its start-up is printed apart). Each Ray timing includes starting the replicas (each imports
torch and loads the run), as a user's call does. Prints a table of seconds and images per second, and checks that
every engine wrote the same rows as the local one (scores within 1e-6). Needs `aeflow[distributed]`.

On a machine with as many free cores as replicas, the replicas score in parallel; with 2 cores shared with other
work, 2 replicas compete for the same cores as the driver, and the numbers are CPU-bound, not a measure of Ray.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def write_archive(folder: Path, count: int, size: int) -> None:
    from aeflow.data.synthetic import make_phantom

    folder.mkdir(parents=True)
    for i in range(count):
        image, _ = make_phantom(7, i, size=size, anomaly="bright_lesion" if i % 3 == 0 else "good")
        path = folder / f"scan{i:05d}.png"
        Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
        if i % 10 == 9:
            path.write_bytes(path.read_bytes()[:100])  # unreadable: goes to skipped.csv


def rows(path: Path) -> dict[tuple[str, str], float]:
    with open(path, newline="") as f:
        return {(r["path"], r["slice"]): float(r["pred_score"]) for r in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder (with threshold.json)")
    parser.add_argument("--tiny-run", action="store_true", help="the tests' untrained 64 px AE-FLOW run")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=256, help="side of the written PNGs (resized to the run's size)")
    parser.add_argument("--workers", default="1,2", help="Ray replica counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local engine")
    args = parser.parse_args()
    if (args.run is None) == (not args.tiny_run):
        parser.error("give --run RUN or --tiny-run")
    import ray
    import torch

    from aeflow.serving.predict import predict_paths

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="aeflow-ray-bench-"))
    try:
        if args.tiny_run:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from serving.conftest import build_run

            args.run = build_run(work / "run")
        write_archive(work / "archive", args.images, args.size)
        counts = [int(w) for w in args.workers.split(",")]
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started = time.perf_counter()
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.perf_counter() - started
        table = []
        started = time.perf_counter()
        reference = rows(predict_paths(args.run, [work / "archive"], work / "local", batch_size=args.batch_size,
                                       progress=False))
        table.append(("local", "-", time.perf_counter() - started))
        for count in counts:
            started = time.perf_counter()
            out = predict_paths(args.run, [work / "archive"], work / f"ray{count}", batch_size=args.batch_size,
                                progress=False, engine="ray", workers=count)
            table.append(("ray", str(count), time.perf_counter() - started))
            found = rows(out)
            assert found.keys() == reference.keys(), f"ray with {count} workers wrote other rows"
            worst = max(abs(found[k] - reference[k]) for k in reference)
            assert worst <= 1e-6, f"ray with {count} workers: scores differ by {worst}"
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    scored = len(reference)
    print(f"machine: {machine()}; os.cpu_count() = {os.cpu_count()}")
    print(f"{args.images} files ({scored} scored, {args.images - scored} unreadable), {args.size} px PNG, "
          f"batch {args.batch_size}; Ray instance start-up {ray_start:.1f} s (not in the table)\n")
    print("| engine | replicas | seconds | files / s |")
    print("|---|---|---|---|")
    for engine, count, seconds in table:
        print(f"| {engine} | {count} | {seconds:.1f} | {args.images / seconds:.1f} |")
    print("\nEvery Ray run wrote the local engine's rows (scores within 1e-6).")


if __name__ == "__main__":
    main()
