"""aeflow against anomalib 2.7, side by side in one process: inference and training-step images/s, peak memory, and
PatchCore's coreset selection, for every method both libraries have.

    make bench-peers                                           # builds .venv-peers when missing, then runs this
    .venv-peers/bin/python benchmarks/vs_anomalib.py           # the default run (25-30 min on 2 busy cores)
    .venv-peers/bin/python benchmarks/vs_anomalib.py --methods padim,patchcore --sizes 128 --batches 32 --rounds 3

What is compared (each pair built once, then timed in interleaved rounds, median of the rounds):
- PaDiM, PatchCore, FastFlow, CFlow, DRAEM, GANomaly: each library's own model for the method, and aeflow's AE-FLOW
  against anomalib's FastFlow three times: the `paper` preset's arguments ("aeflow"), the leaderboards' set-up
  ("aeflow_board") and the model's own defaults ("aeflow_default").
- Backbone models (PaDiM, PatchCore, FastFlow, CFlow, AE-FLOW): ResNet-18 with RANDOM weights on both sides
  (aeflow `pretrained=False`, anomalib `pre_trained=False`; speed does not depend on the weights and nothing is
  downloaded), layers 1-3 (strides 4, 8, 16) for PaDiM, FastFlow and CFlow on both sides, layers 2-3 for PatchCore
  on both sides (CFlow's anomalib default is layers 2-4: set to 1-3 here to match aeflow). The paper's AE-FLOW uses the
  stride-16 stage only, the other two the strides 8 and 16.
- Input: anomalib's models take RGB (3 channels) and are given RGB; aeflow's backbone models are given the same RGB
  tensor; aeflow's DRAEM, GANomaly and AE-FLOW are built for grayscale (in_channels=1, their default, the
  library's medical use) and given 1 channel. Both sides get the same image size, batch and thread count.
- anomalib's `.model` (the torch module under the Lightning module) is called directly: its pre-processing
  (resize, ImageNet normalisation) is not timed; aeflow normalises inside the model, which is timed.
- Memory-bank models are fitted on `--fit-images` random images first, so that inference runs the real code path
  (PaDiM's Gaussians, PatchCore's coreset-subsampled bank, ratio 0.1, the same bank size on both sides).
- Training step: forward + loss + backward + optimiser step(s) of one batch, each library's own loss and optimiser
  (anomalib: the Lightning module's `training_step`, with `optimizers()` / `manual_backward` supplied where it
  optimises by hand (CFlow, GANomaly); aeflow: `model.loss(batch)["loss"]` and the Adam its training uses,
  `aeflow.training.module.adam`, fused).
- Peak memory: a fresh subprocess per contender that imports only its own library, builds, fits and runs inference
  at one size and batch: its own peak resident memory (VmHWM; a child's ru_maxrss starts from its parent's
  peak) and the resident memory just before the first inference.
- PatchCore's coreset: anomalib's KCenterGreedy against aeflow.models.patchcore.greedy_coreset on the SAME bank of
  ResNet-18 (random weights) layer-2+3 patch features of synthetic phantoms, the same ratio and coreset size; time
  of each and the coverage radius (largest distance of a bank point to its nearest selected centre) in the full
  feature space, over three seeds; both run in one child process with a fixed glibc mmap threshold (CORESET_ENV).
- GFLOP/img: FLOPs of one batch-1 inference, counted by torch's dispatcher (matmuls and convolutions), so that a
  ratio can be read against the work each model does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import count_flops, emit_table, machine, peak_rss_mb  # noqa: E402

AEFLOWS = ("aeflow", "aeflow_board", "aeflow_default")
METHODS = ("padim", "patchcore", "fastflow", "cflow", "draem", "ganomaly", *AEFLOWS)
TRAINED = ("fastflow", "cflow", "draem", "ganomaly", *AEFLOWS)
# AE-FLOW is compared with anomalib's FastFlow, three times: "aeflow" is the paper's model (preset "paper": residual
# coupling subnets, 512/256/64 decoder, one stride-16 stage); "aeflow_board" is the set-up both leaderboards
# measured (docs/results/leaderboard_*.md: conv coupling subnets, 128/64/32 decoder, the model's defaults
# otherwise: stages 8 and 16, memory of z', validated score blend); "aeflow_default" is the model's own defaults
# (resnet coupling subnets, 128/64/32 decoder since 2026-12-04), what `create_model("aeflow")` builds
ANOMALIB_NAME = {name: "fastflow" for name in AEFLOWS}
BOARD_AEFLOW = {"subnet": "conv", "decoder_widths": [128, 64, 32]}
CORESET_RATIO = 0.1
BACKBONE = "resnet18"


def quiet():
    """Silence progress bars and warnings of a call (tqdm writes to the stderr of the moment it starts)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


class Contender:
    """One library's model for one method at one image size: `infer(x)` and `train_step(x)` (built lazily)."""

    def __init__(self, lib: str, method: str, channels: int, module: torch.nn.Module, infer, make_train_step=None,
                 backend: str = "eager"):
        self.lib, self.method, self.channels, self.module = lib, method, channels, module
        self.infer, self.make_train_step, self.backend = infer, make_train_step, backend


# --- anomalib -------------------------------------------------------------------------------------------------


def _anomalib_lightning(cls, size: int, **kwargs):
    return cls(pre_processor=cls.configure_pre_processor(image_size=(size, size)), post_processor=False,
               evaluator=False, visualizer=False, **kwargs)


def _no_trainer(module, optimizers=None):
    """Let a Lightning module's training_step run without a Trainer: logging off, manual optimisation by hand."""
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
    if optimizers is not None:
        module.optimizers = lambda *a, **k: optimizers
    return module


def _first_optimizer(configured):
    while isinstance(configured, (list, tuple)):
        configured = configured[0]
    return configured


def build_anomalib(method: str, size: int, fit_images: int) -> Contender:
    import anomalib.models as am

    method = ANOMALIB_NAME.get(method, method)
    fit_x = torch.rand(fit_images, 3, size, size)
    if method == "padim":
        lm = _anomalib_lightning(am.Padim, size, backbone=BACKBONE, layers=["layer1", "layer2", "layer3"],
                                 pre_trained=False, n_features=100)
        model = lm.model.train()
        with torch.no_grad():
            model(fit_x)
        model.fit()
    elif method == "patchcore":
        lm = _anomalib_lightning(am.Patchcore, size, backbone=BACKBONE, layers=("layer2", "layer3"),
                                 pre_trained=False, coreset_sampling_ratio=CORESET_RATIO, num_neighbors=9)
        model = lm.model.train()
        with torch.no_grad(), quiet():
            model(fit_x)
            model.subsample_embedding(CORESET_RATIO)
    elif method == "fastflow":
        lm = _anomalib_lightning(am.Fastflow, size, backbone=BACKBONE, pre_trained=False, flow_steps=8)
    elif method == "cflow":
        lm = _anomalib_lightning(am.Cflow, size, backbone=BACKBONE, layers=("layer1", "layer2", "layer3"),
                                 pre_trained=False)
    elif method == "draem":
        empty = Path(os.environ.get("TMPDIR", "/tmp")) / "vs_anomalib_no_dtd"  # an existing folder: no DTD download,
        empty.mkdir(exist_ok=True)  # and without texture files anomalib's augmenter uses Perlin noise as the source
        lm = _anomalib_lightning(am.Draem, size, dtd_dir=empty)
    elif method == "ganomaly":
        lm = _anomalib_lightning(am.Ganomaly, size)
    else:
        raise ValueError(method)
    model = lm.model.eval()

    def infer(x):
        with torch.no_grad():
            return model(x)

    def make_train_step():
        lm.train()
        if method in ("padim", "patchcore"):
            return None
        configured = lm.configure_optimizers()
        if method == "ganomaly":
            optimizers = tuple(configured)  # (discriminator, generator)
            _no_trainer(lm, optimizers)

            def step(x):
                lm.training_step(types.SimpleNamespace(image=x), 0)
            return step
        optimizer = _first_optimizer(configured)
        if method == "cflow":  # manual optimisation: one step per fibre batch inside training_step
            _no_trainer(lm, optimizer)

            def step(x):
                lm.training_step(types.SimpleNamespace(image=x))
            return step
        _no_trainer(lm)

        def step(x):
            optimizer.zero_grad(set_to_none=True)
            loss = lm.training_step(types.SimpleNamespace(image=x))["loss"]
            loss.backward()
            optimizer.step()
        return step

    return Contender("anomalib", method, 3, model, infer, make_train_step)


# --- aeflow ---------------------------------------------------------------------------------------------------


def _aeflow_batch(x: torch.Tensor):
    from aeflow.data.sample import Sample, collate

    return collate([Sample(image=image, label=0, path="") for image in x])


def build_aeflow(method: str, size: int, fit_images: int, fast: bool = False) -> Contender:
    from aeflow.models import create_model

    channels = 3
    if method == "padim":
        model = create_model("padim", backbone=BACKBONE, pretrained=False, n_features=100)
    elif method == "patchcore":
        model = create_model("patchcore", backbone=BACKBONE, pretrained=False, coreset_ratio=CORESET_RATIO,
                             num_neighbors=9)
    elif method in ("fastflow", "cflow"):
        model = create_model(method, backbone=BACKBONE, pretrained=False)
    elif method in ("draem", "ganomaly"):
        channels = 1
        model = create_model(method)
    elif method == "aeflow":
        from aeflow.training.presets import preset

        channels = 1
        kwargs = {**preset("paper")["model_kwargs"], "backbone": BACKBONE, "pretrained": False}
        model = create_model("aeflow", **kwargs)
    elif method == "aeflow_board":
        channels = 1
        model = create_model("aeflow", backbone=BACKBONE, pretrained=False, **BOARD_AEFLOW)
    elif method == "aeflow_default":
        channels = 1
        model = create_model("aeflow", backbone=BACKBONE, pretrained=False)
    else:
        raise ValueError(method)
    fit_x = torch.rand(fit_images, channels, size, size)
    model.eval()
    if not model.trained_by_gradient:
        model.fit([_aeflow_batch(fit_x)])
    elif method in AEFLOWS:
        if model.n_stages:
            model.fit_reference([fit_x])
        model.calibrate([fit_x])  # the paper preset's raw blend needs none; harmless, and the real path otherwise
    model.eval()

    def infer(x):
        with torch.no_grad():
            return model.predict(x)

    if fast:  # aeflow's inference path as predict / serve / test run it: the measured best backend
        from aeflow.backends import make_predictor

        predictor = make_predictor(model, (channels, size, size), backend="auto", batch_size=16)
        return Contender("aeflow-fast", method, channels, model, predictor, backend=predictor.name)

    def make_train_step():
        if not model.trained_by_gradient:
            return None
        from aeflow.training.module import adam

        model.train()
        optimizer = adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # as aeflow's training

        def step(x):
            batch = _aeflow_batch(x)
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch)["loss"].backward()
            optimizer.step()
        return step

    return Contender("aeflow", method, channels, model, infer, make_train_step)


BUILDERS = {"anomalib": build_anomalib, "aeflow": build_aeflow,
            "aeflow-fast": lambda method, size, fit_images: build_aeflow(method, size, fit_images, fast=True)}


# --- timing ---------------------------------------------------------------------------------------------------


def interleaved(calls: dict, images_per_call: int, rounds: int, seconds: float, warmup: int = 2) -> dict:
    """Median images/s per name: `warmup` calls each (the first one or two calls of a new shape are several times
    slower, measured up to 30x for a training step), then `rounds` rounds in which every callable runs for at least
    `seconds` (and at least one call), the callables taking turns."""
    per_round = {name: [] for name in calls}
    for fn in calls.values():
        with quiet():
            for _ in range(warmup):
                fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            n, start = 0, time.perf_counter()
            with quiet():
                while n == 0 or time.perf_counter() - start < seconds:
                    fn()
                    n += 1
            per_round[name].append(n * images_per_call / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in per_round.items()}


def flops_per_image(c: Contender, size: int) -> float:
    x = torch.rand(1, c.channels, size, size)
    with quiet():
        return count_flops(c.infer, x) / 1e9


def run_inference(args, methods) -> list[dict]:
    rows = []
    for size in args.sizes:
        contenders = {}
        for method in methods:
            for lib in ("anomalib", "aeflow", "aeflow-fast"):
                t0 = time.perf_counter()
                with quiet():
                    contenders[lib, method] = BUILDERS[lib](method, size, args.fit_images)
                print(f"  built {lib} {method} at {size} px in {time.perf_counter() - t0:.1f} s", flush=True)
        gflops = {key: flops_per_image(c, size) for key, c in contenders.items() if key[0] != "aeflow-fast"}
        for batch in args.batches:
            torch.manual_seed(0)
            inputs = {ch: torch.rand(batch, ch, size, size) for ch in (1, 3)}
            calls = {key: (lambda c=c: c.infer(inputs[c.channels])) for key, c in contenders.items()}
            t0 = time.perf_counter()
            speed = interleaved(calls, batch, args.rounds, args.seconds)
            print(f"  inference {size} px, batch {batch}: {time.perf_counter() - t0:.0f} s", flush=True)
            for method in methods:
                a, b, f = speed["anomalib", method], speed["aeflow", method], speed["aeflow-fast", method]
                rows.append({"method": method, "size": size, "batch": batch, "anomalib": a, "aeflow": b,
                             "ratio": b / a, "aeflow_fast": f, "ratio_fast": f / a,
                             "fast_backend": contenders["aeflow-fast", method].backend,
                             "gflop_anomalib": gflops["anomalib", method], "gflop_aeflow": gflops["aeflow", method]})
                print(f"    {method}: anomalib {a:.2f} img/s, aeflow eager {b:.2f} img/s (ratio {b / a:.2f}), aeflow "
                      f"{rows[-1]['fast_backend']} {f:.2f} img/s (ratio {f / a:.2f})", flush=True)
        del contenders
    return rows


def run_training(args, methods) -> list[dict]:
    rows = []
    methods = [m for m in methods if m in TRAINED]
    for size in args.train_sizes:
        steps, inputs = {}, {}
        torch.manual_seed(0)
        for ch in (1, 3):
            inputs[ch] = torch.rand(args.train_batch, ch, size, size)
        for method in methods:
            for lib in ("anomalib", "aeflow"):
                with quiet():
                    c = BUILDERS[lib](method, size, 2)
                    step = c.make_train_step()
                steps[lib, method] = (lambda step=step, ch=c.channels: step(inputs[ch]))
        t0 = time.perf_counter()
        speed = interleaved(steps, args.train_batch, args.train_rounds, args.seconds)
        print(f"  training {size} px, batch {args.train_batch}: {time.perf_counter() - t0:.0f} s", flush=True)
        for method in methods:
            a, b = speed["anomalib", method], speed["aeflow", method]
            rows.append({"method": method, "size": size, "batch": args.train_batch, "anomalib": a, "aeflow": b,
                         "ratio": b / a})
            print(f"    {method}: anomalib {a:.2f} img/s, aeflow {b:.2f} img/s, ratio {b / a:.2f}", flush=True)
    return rows


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_one(args) -> None:
    """In a fresh process: build one contender, fit it, run `--memory-calls` inferences; print the memory."""
    torch.set_num_threads(args.threads)
    lib, method = args.memory_one.split(":")
    with quiet():
        c = BUILDERS[lib](method, args.memory_size, args.fit_images)
    x = torch.rand(args.memory_batch, c.channels, args.memory_size, args.memory_size)
    before = proc_status_mb("VmRSS")
    with quiet():
        for _ in range(3):
            c.infer(x)
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's peak at fork (measured: every
    # contender reported the parent's 3881 MB), VmHWM is the peak of this process's own address space since exec.
    print(json.dumps({"before_mb": before, "peak_mb": proc_status_mb("VmHWM"), "ru_maxrss_mb": peak_rss_mb()}))


def run_memory(args, methods) -> list[dict]:
    rows = []
    for method in methods:
        row = {"method": method}
        for lib in ("anomalib", "aeflow"):
            cmd = [sys.executable, __file__, "--memory-one", f"{lib}:{method}", "--threads", str(args.threads),
                   "--memory-size", str(args.memory_size), "--memory-batch", str(args.memory_batch),
                   "--fit-images", str(args.fit_images)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row[lib] = json.loads(out)
        rows.append(row)
        print(f"    {method}: anomalib peak {row['anomalib']['peak_mb']:.0f} MB, aeflow peak "
              f"{row['aeflow']['peak_mb']:.0f} MB", flush=True)
    return rows


def coverage_radius(bank: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> float:
    """max over bank rows of the distance to the nearest centre, in the full feature space."""
    worst = 0.0
    for start in range(0, len(bank), chunk):
        d = torch.cdist(bank[start:start + chunk].double(), centres.double()).amin(1)
        worst = max(worst, float(d.max()))
    return worst


CORESET_SEEDS = (0, 1, 2)
# glibc's allocator, left to itself, grew anomalib 2.7's KCenterGreedy (torch 2.14.1, CPU) by one 20000 x 244 float
# buffer per centre (about 0.46 GB/s here; the process was killed past 24 GB, before its 2000 centres were chosen):
# each step's `features - center` seems to land in a fresh piece of the heap. A fixed mmap threshold gives such
# buffers back at every free, and the resident memory stays flat (1.1 GB). The selection runs in a child process
# that has it, both libraries in the same child, so the setting applies to both sides alike.
CORESET_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_coreset(args) -> dict:
    """Both selections over CORESET_SEEDS in a child process with CORESET_ENV; its JSON result."""
    cmd = [sys.executable, __file__, "--coreset-one", "--threads", str(args.threads), "--bank", str(args.bank),
           "--bank-seed", str(args.bank_seed)]
    env = {**os.environ, **(CORESET_ENV if args.coreset_env == "mmap" else {})}
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def coreset_one(args) -> None:
    import numpy as np
    from anomalib.models.components.sampling import KCenterGreedy

    from aeflow.data.synthetic import make_phantom
    from aeflow.models import create_model
    from aeflow.models.patchcore import CORESET_BLOCK, greedy_coreset

    torch.set_num_threads(args.threads)
    size = 128
    torch.manual_seed(args.bank_seed)  # the embedder's random weights, so the bank does not depend on earlier parts
    embedder = create_model("patchcore", backbone=BACKBONE, pretrained=False).eval()
    per_image = (size // 8) ** 2
    n_images = math.ceil(args.bank / per_image)
    parts = []
    with torch.no_grad():
        for start in range(0, n_images, 32):
            images = torch.from_numpy(np.stack([make_phantom(0, i, size=size)[0]
                                                for i in range(start, min(n_images, start + 32))]))[:, None]
            parts.append(embedder.embed(images).permute(0, 2, 3, 1).flatten(0, 2))
    bank = torch.cat(parts)[: args.bank].contiguous()
    k = int(len(bank) * CORESET_RATIO)
    print(f"  coreset: bank {tuple(bank.shape)}, selecting {k}, seeds {CORESET_SEEDS}", file=sys.stderr, flush=True)
    block = CORESET_BLOCK  # what PatchCore.fit uses
    runs = []
    for seed in CORESET_SEEDS:
        # anomalib draws its first centre and its projection from torch's global generator, and the projection's
        # column indices from numpy's (sklearn's sample_without_replacement with random_state=None)
        torch.manual_seed(seed)
        np.random.seed(seed)
        start = time.perf_counter()
        with quiet(), torch.no_grad():
            idx_anomalib = KCenterGreedy(embedding=bank, sampling_ratio=CORESET_RATIO).select_coreset_idxs()
        t_anomalib = time.perf_counter() - start
        start = time.perf_counter()
        idx_aeflow = greedy_coreset(bank, k, 128, torch.Generator().manual_seed(seed), block=block)
        t_aeflow = time.perf_counter() - start
        runs.append({"seed": seed, "t_anomalib": t_anomalib, "t_aeflow": t_aeflow,
                     "r_anomalib": coverage_radius(bank, bank[torch.as_tensor(idx_anomalib)]),
                     "r_aeflow": coverage_radius(bank, bank[idx_aeflow]),
                     "unique_anomalib": len(set(idx_anomalib)), "unique_aeflow": len(set(idx_aeflow.tolist()))})
        print(f"    seed {seed}: anomalib {t_anomalib:.1f} s radius {runs[-1]['r_anomalib']:.3f}; aeflow "
              f"{t_aeflow:.2f} s radius {runs[-1]['r_aeflow']:.3f}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    idx_exact = greedy_coreset(bank, k, 128, torch.Generator().manual_seed(CORESET_SEEDS[0]), block=1)
    t_exact = time.perf_counter() - start
    env = {key: os.environ[key] for key in CORESET_ENV if key in os.environ}
    print(json.dumps({"n": len(bank), "dim": bank.shape[1], "k": k, "block": block, "runs": runs,
                      "t_exact": t_exact, "r_exact": coverage_radius(bank, bank[idx_exact]), "env": env}))


# --- report ---------------------------------------------------------------------------------------------------


def label(method: str) -> str:
    return {"aeflow": "AE-FLOW (paper) vs FastFlow", "aeflow_board": "AE-FLOW (boards' set-up) vs FastFlow",
            "aeflow_default": "AE-FLOW (defaults) vs FastFlow"}.get(method, method)


def report(args, command: str, load: str, infer_rows, train_rows, memory_rows, coreset) -> str:
    import anomalib

    import aeflow

    lines = ["# aeflow against anomalib", "",
             f"Command: `{command}`", "",
             f"Machine: {machine()}; torch.set_num_threads({args.threads}).",
             f"Versions: aeflow {getattr(aeflow, '__version__', '?')}, anomalib {anomalib.__version__}, "
             f"torch {torch.__version__}.",
             f"Load average (1, 5, 15 min) at the start and end of the run: {load}.", "",
             "Both libraries run side by side in one process, each model built once, timed in interleaved rounds "
             f"({args.rounds} rounds for inference, {args.train_rounds} for training, after 2 warm-up calls; at least {args.seconds:g} s or one call per contender per round), median "
             "images/s. ResNet-18 with random weights on both sides. See benchmarks/vs_anomalib.py for what is "
             "compared and where the two differ. Ratio = aeflow / anomalib (higher: aeflow faster).", ""]
    if infer_rows:
        lines += ["## Inference (eval mode, no_grad)", "",
                  "aeflow eager: model.predict in PyTorch; aeflow fast path: what predict / serve / test / the "
                  "estimator run, the backend `aeflow.backends` chose at batch 16 (its outputs within 1e-4 of eager), "
                  "named in the column. anomalib: its torch model, eager.", "",
                  "| method | size | batch | anomalib img/s | aeflow eager img/s | ratio | aeflow fast path img/s "
                  "| backend | ratio | GFLOP/img anomalib | GFLOP/img aeflow |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in infer_rows:
            lines.append(f"| {label(r['method'])} | {r['size']} | {r['batch']} | {r['anomalib']:.2f} | {r['aeflow']:.2f} "
                         f"| {r['ratio']:.2f} | {r['aeflow_fast']:.2f} | {r['fast_backend']} | {r['ratio_fast']:.2f} "
                         f"| {r['gflop_anomalib']:.2f} | {r['gflop_aeflow']:.2f} |")
        lines.append("")
    if train_rows:
        lines += ["## Training step (forward + loss + backward + optimiser step)", "",
                  "| method | size | batch | anomalib img/s | aeflow img/s | ratio |", "|---|---|---|---|---|---|"]
        for r in train_rows:
            lines.append(f"| {label(r['method'])} | {r['size']} | {r['batch']} | {r['anomalib']:.2f} | {r['aeflow']:.2f} "
                         f"| {r['ratio']:.2f} |")
        lines.append("")
    if memory_rows:
        lines += [f"## Peak memory (inference, {args.memory_size} px, batch {args.memory_batch}; one fresh process per "
                  "contender, importing only its own library; peak = VmHWM)", "",
                  "| method | anomalib peak MB | aeflow peak MB | ratio | anomalib MB before inference | "
                  "aeflow MB before inference |", "|---|---|---|---|---|---|"]
        for r in memory_rows:
            a, b = r["anomalib"], r["aeflow"]
            lines.append(f"| {label(r['method'])} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
                         f"{b['peak_mb'] / a['peak_mb']:.2f} | {a['before_mb']:.0f} | {b['before_mb']:.0f} |")
        lines.append("")
    if coreset:
        c, runs = coreset, coreset["runs"]

        def mean(key: str) -> float:
            return statistics.mean(r[key] for r in runs)

        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines += ["## PatchCore coreset selection (same bank, same ratio)", "",
                  f"Bank: {c['n']} x {c['dim']} ResNet-18 (random weights) layer-2+3 patch features of synthetic "
                  f"phantoms at 128 px; {c['k']} centres (ratio {CORESET_RATIO}). anomalib: KCenterGreedy (sparse "
                  "random projection, eps 0.9); aeflow: greedy_coreset (Gaussian projection to 128 dims, its "
                  f"default block of up to {c['block']} centres per round). Coverage "
                  "radius: largest distance of a bank point to its nearest centre, in the full space. Seeds "
                  f"{seeds} (each seed: both libraries' first centre and projection); means over them. Run in a "
                  f"child process with {' '.join(f'{k}={v}' for k, v in c['env'].items()) or 'glibc defaults'} "
                  "(see CORESET_ENV in the script).", "",
                  "| | anomalib | aeflow | aeflow / anomalib |", "|---|---|---|---|",
                  f"| time (s) | {mean('t_anomalib'):.2f} | {mean('t_aeflow'):.2f} | "
                  f"{mean('t_aeflow') / mean('t_anomalib'):.3f} "
                  f"(speed-up {mean('t_anomalib') / mean('t_aeflow'):.1f}x) |",
                  f"| coverage radius | {mean('r_anomalib'):.3f} | {mean('r_aeflow'):.3f} | "
                  f"{mean('r_aeflow') / mean('r_anomalib'):.3f} |",
                  f"| distinct centres | {min(r['unique_anomalib'] for r in runs)} | "
                  f"{min(r['unique_aeflow'] for r in runs)} | |", "",
                  "Per seed (time s / radius): " + "; ".join(
                      f"seed {r['seed']}: anomalib {r['t_anomalib']:.2f} / {r['r_anomalib']:.3f}, aeflow "
                      f"{r['t_aeflow']:.2f} / {r['r_aeflow']:.3f}" for r in runs) + ".", "",
                  f"aeflow one centre per round (block 1), seed {runs[0]['seed']}: {c['t_exact']:.2f} s, coverage "
                  f"radius {c['r_exact']:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--sizes", type=ints, default=[64, 128], help="256 too: add it (far over 20 min on 2 cores)")
    parser.add_argument("--batches", type=ints, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="least time per contender per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-images", type=int, default=16, help="random images PaDiM / PatchCore are fitted on")
    parser.add_argument("--train-sizes", type=ints, default=[64])
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--bank", type=int, default=20000, help="patches in the coreset benchmark's bank")
    parser.add_argument("--bank-seed", type=int, default=0, help="seed of the random weights that embed the bank")
    parser.add_argument("--parts", default="infer,train,memory,coreset")
    parser.add_argument("--out", default="docs/results/vs_anomalib.md")
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)
    parser.add_argument("--coreset-env", choices=["mmap", "default"], default="mmap",
                        help="the coreset child's allocator: CORESET_ENV (mmap) or glibc's defaults")
    parser.add_argument("--coreset-one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_one:
        memory_one(args)
        return
    if args.coreset_one:
        coreset_one(args)
        return
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    parts = set(args.parts.split(","))
    command = " ".join([".venv-peers/bin/python", "benchmarks/vs_anomalib.py", *sys.argv[1:]])
    load_start = "%.2f %.2f %.2f" % os.getloadavg()
    print(f"machine: {machine()}", flush=True)
    print(f"load average at start: {load_start}", flush=True)
    started = time.perf_counter()
    infer_rows = run_inference(args, methods) if "infer" in parts else []
    train_rows = run_training(args, methods) if "train" in parts else []
    memory_rows = run_memory(args, methods) if "memory" in parts else []
    coreset = run_coreset(args) if "coreset" in parts and "patchcore" in methods else None
    load = f"{load_start} at the start, {'%.2f %.2f %.2f' % os.getloadavg()} at the end"
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    emit_table(report(args, command, load, infer_rows, train_rows, memory_rows, coreset), args.out)


if __name__ == "__main__":
    main()
