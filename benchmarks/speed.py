"""AE-FLOW speed and memory: training and inference images/s, peak memory, FLOPs and the share of the
machine's dense-matmul throughput the model reaches.

    python benchmarks/speed.py                       # paper model (Wide-ResNet-50-2), 256 x 256, fp32 + bf16
    python benchmarks/speed.py --backbone efficientnet_lite0 --size 128

fp32 inference is measured through each of `--backends` (default eager and auto: the fast path that predict,
serve, test and the estimator use, aeflow.backends), with the backend auto chose in the table.
Each measurement runs in a fresh subprocess so that its peak resident memory is its own. Pretrained weights
are not needed for speed: the backbone is built with random weights (same shapes, same FLOPs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import count_flops, machine, matmul_flops, peak_rss_mb, timed  # noqa: E402


def build(backbone: str, size: int, channels_last: bool):
    from aeflow.models import create_model
    from aeflow.training.presets import preset

    # The paper's model (the `paper` preset's arguments: one stride-16 flow, no reference, raw blend, residual map).
    model = create_model("aeflow", **{**preset("paper")["model_kwargs"], "backbone": backbone, "pretrained": False})
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def measure(args) -> dict:
    """One (mode, precision, batch) measurement in this process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.backbone, args.size, args.channels_last)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    x = torch.rand(args.batch, 1, args.size, args.size)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    if args.mode == "train":
        from aeflow.data.sample import Batch

        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        batch = Batch(x, torch.zeros(args.batch, dtype=torch.long), torch.zeros(args.batch, args.size, args.size),
                      torch.zeros(args.batch, dtype=torch.bool), [""] * args.batch, [""] * args.batch)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model.loss(batch)["loss"]
            loss.backward()
            optimizer.step()

        seconds = timed(step, warmup=1, min_seconds=args.seconds, min_calls=2)
        flops = None
    else:
        model.eval()
        run, chosen = model.predict, "eager"
        if args.backend != "eager":  # aeflow's fast inference path (aeflow.backends), fp32 only
            from aeflow.backends import make_predictor

            predictor = make_predictor(model, (1, args.size, args.size), backend=args.backend, batch_size=args.batch)
            run, chosen = predictor, predictor.name

        def infer():
            with torch.inference_mode(), autocast:
                run(x)

        seconds = timed(infer, warmup=1, min_seconds=args.seconds, min_calls=2)
        with torch.no_grad(), autocast:  # the FLOP counter's hooks do not work under inference_mode
            flops = count_flops(model.predict, x[:1])
    return {"images_per_s": args.batch / seconds, "seconds_per_batch": seconds, "flops_per_image": flops,
            "peak_rss_mb": peak_rss_mb(), "backend": chosen if args.mode != "train" else "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing per measurement")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--backends", default="eager,auto", help="fp32 inference through these aeflow.backends "
                                                                  "(eager, auto, channels_last, onnxruntime)")
    parser.add_argument("--backend", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="infer", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"model: AE-FLOW, {args.backbone} encoder (frozen), 8 flow steps (resnet subnet), {args.size}x{args.size}, "
          f"1 channel{', channels_last' if args.channels_last else ''}")
    ceilings = {p: matmul_flops(torch.bfloat16 if p == "bf16" else torch.float32) for p in args.precisions.split(",")}
    rows = []
    for precision in args.precisions.split(","):
        backends = args.backends.split(",") if precision == "fp32" else ["eager"]
        runs = [("train", args.train_batch, "eager")] + [("infer", b, name) for name in backends for b in (1, 32)]
        for mode, batch, backend in runs:
            cmd = [sys.executable, __file__, "--one", "--mode", mode, "--precision", precision, "--batch", str(batch),
                   "--backbone", args.backbone, "--size", str(args.size), "--threads", str(args.threads),
                   "--seconds", str(args.seconds), "--backend", backend] + (
                       ["--channels-last"] if args.channels_last else [])
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rows.append((precision, mode, batch, result))
    flops = next(r["flops_per_image"] for *_, r in rows if r["flops_per_image"])
    print(f"model FLOPs per image (inference, counted): {flops / 1e9:.1f} GFLOP")
    for p, c in ceilings.items():
        print(f"dense matmul ceiling {p}: {c / 1e9:.1f} GFLOP/s")
    print()
    print("| precision | mode | backend | batch | images/s | s/batch | peak RSS (MB) | share of matmul FLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for precision, mode, batch, r in rows:
        share = f"{r['images_per_s'] * flops / ceilings[precision]:.0%}" if mode == "infer" else "-"
        print(f"| {precision} | {mode} | {r['backend']} | {batch} | {r['images_per_s']:.2f} | "
              f"{r['seconds_per_batch']:.2f} | {r['peak_rss_mb']:.0f} | {share} |")


if __name__ == "__main__":
    main()
