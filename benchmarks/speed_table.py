"""One speed table for every method, from the run folders of one `aeflow benchmark` invocation: fit seconds,
eager inference images/s and peak memory (the leaderboard's own columns, benchmark.json), and the fast inference
path that `aeflow.backends` chose for the run (inference_backend.json: backend and its images/s at its timing batch).

    python benchmarks/speed_table.py runs/speed_all_methods > docs/results/speed_all_methods.md

It reads, it measures nothing: the numbers are those the benchmark wrote, one run after another on one machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    args = parser.parse_args()
    rows = []
    for record_path in sorted(args.runs.glob("*/benchmark.json")):
        run = record_path.parent
        record = json.loads(record_path.read_text())
        config = json.loads((run / "config.json").read_text())
        backend_path = run / "inference_backend.json"
        backend = json.loads(backend_path.read_text()) if backend_path.exists() else {}
        chosen = backend.get("backend", "n/a")
        fast = backend.get("candidates", {}).get(chosen, {}).get("images_per_second")
        rows.append((config["train"]["model"], record, chosen, fast, backend.get("timing_batch")))
    print("| model | backbone | fit time (s) | inference images/s (eager, batch 32) | peak memory (MB) | "
          "fast path | fast path images/s (timing batch) |")
    print("|---|---|---|---|---|---|---|")
    for model, record, chosen, fast, batch in sorted(rows, key=lambda r: r[1]["test_images_per_second"], reverse=True):
        fast_cell = f"{fast:.0f} (batch {batch})" if fast else "n/a"
        print(f"| {model} | {record.get('backbone') or 'none'} | {record['fit_seconds']:.1f} | "
              f"{record['test_images_per_second']:.1f} | {record['peak_rss_mb']:.0f} | {chosen} | {fast_cell} |")


if __name__ == "__main__":
    main()
