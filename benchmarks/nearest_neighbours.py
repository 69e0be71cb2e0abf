"""The 1-NN search of the memory-bank models, before and after `nearest_neighbours` became one product of augmented
matrices with a min (aeflow.models.patchcore): predict images/s of AE-FLOW's memory reference (the `quick`
preset's model) and PatchCore (10 % coreset), both ways in one process, interleaved rounds, median.

    python benchmarks/nearest_neighbours.py            # 64 px, batch 32, 1 thread

Weights are the packaged EfficientNet-Lite0's; the banks come from random images (the search's cost depends on the
bank's size, not its content). The earlier search (torch.cdist + topk) is kept here only as the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

import aeflow.models.aeflow as aeflow_module
import aeflow.models.patchcore as patchcore_module
from aeflow.models import create_model
from aeflow.training.presets import preset

NEW = patchcore_module.nearest_neighbours


def cdist_topk(queries: torch.Tensor, bank: torch.Tensor, k: int = 1):
    """The earlier search: torch.cdist per chunk, then top-k."""
    chunk = max(1, patchcore_module.CDIST_CHUNK_ELEMENTS // len(bank))
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        values, index = torch.cdist(queries[start : start + chunk], bank).topk(k, dim=1, largest=False)
        distances.append(values)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def use(search) -> None:
    patchcore_module.nearest_neighbours = search
    aeflow_module.nearest_neighbours = search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-batches", type=int, default=22, help="batches of random training images")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = [torch.rand(args.batch, 1, args.size, args.size) for _ in range(args.train_batches)]
    aeflow = create_model("aeflow", **preset("quick")["model_kwargs"]).eval()
    aeflow.fit_reference(train)
    aeflow.calibrate(train[:4])
    patchcore = create_model("patchcore", backbone="efficientnet_lite0", coreset_ratio=0.1).eval()
    patchcore.fit([SimpleNamespace(image=t) for t in train])
    x = torch.rand(args.batch, 1, args.size, args.size)
    searches = {"before": cdist_topk, "now": NEW}  # torch.cdist + topk; the augmented product + min
    print(f"{args.size} px, batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved rounds, median")
    print("| model | search | images/s | ratio | max abs score difference |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, model in (("AE-FLOW (quick preset, memory)", aeflow), ("PatchCore (10 % coreset)", patchcore)):
            speed = {label: [] for label in searches}
            scores = {}
            for _ in range(args.rounds):
                for label, search in searches.items():
                    use(search)
                    model.predict(x)
                    start = time.perf_counter()
                    scores[label] = model.predict(x)["pred_score"]
                    speed[label].append(args.batch / (time.perf_counter() - start))
            before, now = statistics.median(speed["before"]), statistics.median(speed["now"])
            diff = float((scores["before"] - scores["now"]).abs().max())
            print(f"| {name} | before | {before:.1f} | | |")
            print(f"| {name} | now | {now:.1f} | {now / before:.2f} | {diff:.1e} |")
    use(NEW)


if __name__ == "__main__":
    main()
