"""The whole fuzz corpus through every reader, `predict` (with and without --strict), the folder layout behind
`aeflow data describe`, and the service; prints the counts table quoted in docs/benchmarks.md.

    python benchmarks/fuzz.py [--mutants 66] [--workers 2] [--seed 0] [--timeout 10] [--memory-mb 1024]

The corpus (tests/fuzz_corpus.py) is written into a temporary folder and deleted afterwards: the valid seed
files of every format, the crafted files (one per known way to break a reader), and `--mutants` byte-level
mutants of every seed. Each input runs in a worker process bounded by `--timeout` seconds and `--memory-mb` above
the worker's resting size (past either, the worker is killed, the input counted, and a fresh worker goes on).
The run folder is the tests' tiny untrained AE-FLOW at 64 px (the plumbing is under test, not the model).
Finally the whole corpus goes through one `aeflow predict` command, as an archive would, with and without
--strict. Exits non-zero when any count that must be 0 is not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import machine  # noqa: E402
from fuzz_corpus import STAGES, batch_predict, build_corpus, counts, failures, run_fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=66, help="byte-level mutants per seed file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="memory per input above the worker's rest")
    args = parser.parse_args()

    from serving.conftest import build_run

    with tempfile.TemporaryDirectory(prefix="aeflow-fuzz-") as tmp:
        tmp = Path(tmp)
        run_dir = build_run(tmp / "run")
        corpus = build_corpus(tmp / "corpus", mutants_per_seed=args.mutants, seed=args.seed)
        kinds = {}
        for path in corpus:
            kind = path.name.split("_", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"machine: {machine()}")
        print(f"corpus: {len(corpus)} inputs ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
              f"seed {args.seed}; bounds {args.timeout:g} s and {args.memory_mb:g} MB per input, "
              f"{args.workers} worker(s)")
        started = time.perf_counter()
        report = run_fuzz(corpus, run_dir, tmp / "scratch", workers=args.workers, timeout=args.timeout,
                          memory_mb=args.memory_mb)
        per_file = time.perf_counter() - started
        table = counts(report)
        print(f"per-input stages: {per_file:.0f} s; largest memory of one input above the worker's rest: "
              f"{report['peak_mb']:.0f} MB\n")
        print("| stage    | inputs |   ok | refused | tracebacks | silent drops | unnamed | >= 500 | leaked paths |")
        print("|----------|-------:|-----:|--------:|-----------:|-------------:|--------:|-------:|-------------:|")
        for stage in STAGES:
            row = table[stage]
            print(f"| {stage:8s} | {sum(row.values()):6d} | {row['ok']:4d} | {row['refused']:7d} | "
                  f"{row['traceback']:10d} | {row['silent_drop']:12d} | {row['unnamed']:7d} | {row['5xx']:6d} | "
                  f"{row['leak']:12d} |")
        process = table["process"]
        print(f"\nprocesses: {process['hang']} hangs (> {args.timeout:g} s), {process['memory']} over "
              f"{args.memory_mb:g} MB, {process['dead']} died")

        started = time.perf_counter()
        loose = batch_predict(corpus, run_dir, tmp / "batch")
        strict = batch_predict(corpus, run_dir, tmp / "batch-strict", strict=True)
        print(f"\none `aeflow predict` over all {len(corpus)} inputs: exit {loose['exit']}, "
              f"{len(loose['scored'])} scored, {len(loose['skipped'])} in skipped.csv, {len(loose['neither'])} in "
              f"neither, traceback: {'yes' if loose['traceback'] else 'no'}; with --strict: exit {strict['exit']}, "
              f"traceback: {'yes' if strict['traceback'] else 'no'} ({time.perf_counter() - started:.0f} s)")
        bad = failures(report)
        for path, what in sorted(bad.items())[:20]:
            print(f"  {Path(path).name!r}: {what}")
        must_be_zero = (len(bad) + process["hang"] + process["memory"] + process["dead"] + len(loose["neither"])
                        + loose["traceback"] + strict["traceback"] + (loose["exit"] != 0) + (strict["exit"] != 2))
        return 1 if must_be_zero else 0


if __name__ == "__main__":
    sys.exit(main())
