"""What torch.compile does to a training step: eager against compiled (inductor), one model, same weights.

    python benchmarks/compile_training.py --model fastflow --backbone resnet18 --size 64 --batch 8

A step is forward + loss + backward + Adam step on random images (speed does not depend on the weights, which are
random: pretrained=False). The compiled side compiles the model's `loss` (the optimiser step stays eager); its
first calls, which compile, are timed apart (inductor caches what it compiled on disk, so a second run of the
script compiles faster). Then `--rounds` interleaved rounds of `--calls` steps each; median
seconds per step. aeflow's training does not compile today: this measures whether it should.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import machine  # noqa: E402

from aeflow.models import create_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fastflow")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = create_model(args.model, backbone=args.backbone, pretrained=False).train()
    x = torch.rand(args.batch, args.channels, args.size, args.size)
    batch = types.SimpleNamespace(image=x, label=torch.zeros(args.batch, dtype=torch.long))
    steps, first = {}, {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss = (lambda b, model=model: model.loss(b)["loss"])
        if name == "compiled":
            loss = torch.compile(loss)

        def step(loss=loss, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss(batch).backward()
            optimizer.step()
        start = time.perf_counter()
        step(), step()
        first[name] = time.perf_counter() - start
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                step()
            times[name].append((time.perf_counter() - start) / args.calls)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{machine()}, {args.threads} threads; {args.model} ({args.backbone}), {args.size} px, batch {args.batch}")
    print("| | first two steps (s) | s / step (median) | speed-up |")
    print("|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {first[name]:.1f} | {median[name]:.4f} | {median['eager'] / median[name]:.2f} |")


if __name__ == "__main__":
    main()
