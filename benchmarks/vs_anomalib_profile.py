"""Where the inference time goes, aeflow and anomalib side by side: torch.profiler over the same contenders that
benchmarks/vs_anomalib.py times (same builders, random ResNet-18 weights where a backbone is used).

    .venv-peers/bin/python benchmarks/vs_anomalib_profile.py ganomaly --size 64 --batch 32
    .venv-peers/bin/python benchmarks/vs_anomalib_profile.py fastflow --part train --batch 8

Prints, per library, the total CPU time of `--calls` inference calls (or training steps: forward, loss, backward,
optimiser step, with `--part train`) after 3 warm-up calls, and the operators that take most of it. Profiling adds overhead: compare the two libraries within one run, not with vs_anomalib's
images/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import vs_anomalib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=vs_anomalib.METHODS)
    parser.add_argument("--part", choices=("infer", "train"), default="infer")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for lib, build in (("anomalib", vs_anomalib.build_anomalib), ("aeflow", vs_anomalib.build_aeflow)):
        contender = build(args.method, args.size, 8)
        call = contender.infer if args.part == "infer" else contender.make_train_step()
        if call is None:
            raise SystemExit(f"{args.method} has no training step")
        x = torch.rand(args.batch, contender.channels, args.size, args.size)
        for _ in range(3):
            call(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                call(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"## {lib} {args.method} ({args.part}): {total:.3f} s of CPU time for {args.calls} calls of batch "
              f"{args.batch} at {args.size} px")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
