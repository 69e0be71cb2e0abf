"""Where AE-FLOW's inference time goes: encoder, flow, decoder and the whole `predict`, in ms per image.

    python benchmarks/profile_parts.py --backbone wide_resnet50_2 --size 256 --batch 1 --threads 1
    python benchmarks/profile_parts.py --batch 16 --channels-last-encoder     # encoder weights channels-last

Random weights (same shapes and FLOPs as the pretrained ones). Run it with different --threads while other
jobs load the machine to see thread oversubscription.
"""

from __future__ import annotations

import argparse
import time

import torch


def per_image_ms(fn, batch: int, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats / batch * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--channels-last-encoder", action="store_true")
    args = parser.parse_args()

    from aeflow.models import create_model
    from aeflow.training.presets import preset

    torch.set_num_threads(args.threads)
    # The paper's model (the `paper` preset's arguments: one stride-16 flow, no reference, raw blend, residual map).
    kwargs = {**preset("paper")["model_kwargs"], "backbone": args.backbone, "pretrained": False}
    model = create_model("aeflow", **kwargs).eval()
    if args.channels_last_encoder:
        model.encoder.to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 1, args.size, args.size)
    with torch.no_grad():
        z = model.encoder(x)
        z_prime, _ = model.flow(z)
        parts = {
            "encoder": lambda: model.encoder(x),
            "flow": lambda: model.flow(z),
            "decoder": lambda: model.decoder(z_prime),
            "predict": lambda: model.predict(x),
        }
        print(f"{args.backbone}, {args.size} px, batch {args.batch}, {args.threads} thread(s)"
              f"{', channels-last encoder' if args.channels_last_encoder else ''}")
        for name, fn in parts.items():
            print(f"  {name:8s} {per_image_ms(fn, args.batch, args.repeats):8.0f} ms per image")


if __name__ == "__main__":
    main()
