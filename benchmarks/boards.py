"""Both leaderboards, every method, in one folder per board: the models and constructor options live here only.

    python benchmarks/boards.py magnetic_tile --jobs 2          # runs/boards/magnetic_tile/leaderboard.md
    python benchmarks/boards.py pneumoniamnist --jobs 2        # runs/boards/pneumoniamnist/leaderboard.md
    python benchmarks/boards.py magnetic_tile --print          # the `aeflow benchmark` commands, not run
    python benchmarks/boards.py pneumoniamnist --models ganomaly --out runs/boards/pn_ganomaly   # a subset

Every method with a model of its own (`aeflow models`; WinCLIP and SAA need weights files this machine does not
have, and the supervised probe needs labelled anomalies) runs 3 seeds on the board's split at 64 px, 4 epochs,
batch 32, with the options the boards have always used (DRAEM 8 epochs on every training image augmented,
PatchCore's 1% coreset, the frozen EfficientNet-Lite0 for every feature model, ...). `--jobs N` splits the models
into N groups of about equal cost that run side by side, one thread each (`OMP_NUM_THREADS=1`), into the same
folder; one last `aeflow benchmark` over all models then reuses every finished run (same config) and writes the
board. An interrupted board is continued by running the same command again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = {
    "magnetic_tile": ("magnetic_tile", SHARED / "magnetic_tile"),
    "pneumoniamnist": ("medmnist", SHARED / "pneumoniamnist" / "pneumoniamnist.npz"),
}

LITE = "efficientnet_lite0"
# Model -> its board options. The relative cost (fit seconds of one tile seed, measured) balances the groups.
MODELS: dict[str, tuple[float, list[str]]] = {
    "statistical": (10, []),
    "texture": (22, []),
    "filter_bank": (40, []),
    "knn": (20, [f"knn.backbone={LITE}"]),
    "padim": (20, [f"padim.backbone={LITE}"]),
    "patchcore": (15, [f"patchcore.backbone={LITE}", "patchcore.coreset_ratio=0.01"]),
    "fapm": (15, [f"fapm.backbone={LITE}"]),
    "pni": (110, [f"pni.backbone={LITE}", "pni.epochs=4"]),
    "cfa": (50, [f"cfa.backbone={LITE}", "cfa.epochs=4"]),
    "mspba": (46, ["mspba.patch_sizes=[32,16,8]", "mspba.steps=150", "mspba.batch_size=32"]),
    "aeflow": (90, [f"aeflow.backbone={LITE}", "aeflow.subnet=conv", "aeflow.decoder_widths=[128,64,32]"]),
    "fastflow": (65, [f"fastflow.backbone={LITE}"]),
    "cflow": (110, [f"cflow.backbone={LITE}"]),
    "differnet": (85, [f"differnet.backbone={LITE}", "differnet.test_transforms=4"]),
    "csflow": (120, [f"csflow.backbone={LITE}", "csflow.hidden_channels=64"]),
    "glow": (120, ["glow.steps=4", "glow.hidden_channels=64"]),
    "ae": (130, []),
    "vae": (140, []),
    "cevae": (200, []),
    "ganomaly": (200, []),
    "draem": (600, ["draem.max_epochs=8", "draem.anomaly_probability=1.0"]),
    "mnad": (120, []),
    "edgerec": (200, []),
    "ddad": (320, ["ddad.train_t_max=250"]),
    "memseg": (70, ["memseg.width=16"]),
    "uniad": (80, ["uniad.feature_size=8", "uniad.hidden_dim=128", "uniad.feedforward_dim=512",
                   "uniad.encoder_layers=2", "uniad.decoder_layers=2", "uniad.neighbourhood=3"]),
}


def groups(n: int, names: list[str]) -> list[list[str]]:
    """The models in n groups of about equal cost (largest first, each to the cheapest group so far)."""
    out: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(1, n))]
    for name in sorted(names, key=lambda m: -MODELS[m][0]):
        i = min(range(len(out)), key=lambda j: out[j][0])
        out[i] = (out[i][0] + MODELS[name][0], out[i][1] + [name])
    return [group for _, group in out if group]


def command(board: str, names: list[str], out: Path, seeds: str) -> list[str]:
    layout, root = DATA[board]
    cmd = [str(Path(sys.executable).parent / "aeflow"), "benchmark", "--models", ",".join(names),
           "--data", layout, "--root", str(root.resolve()), "--seeds", seeds, "--image-size", "64",
           "--epochs", "4", "--batch-size", "32", "--out", str(out)]
    for name in names:
        for option in MODELS[name][1]:
            cmd += ["-m", option]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("board", choices=sorted(DATA))
    parser.add_argument("--jobs", type=int, default=1, help="groups of models run side by side, one thread each")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", help="a comma-separated subset (e.g. a model whose defaults changed), into its "
                                         "own --out: default every model")
    parser.add_argument("--out", type=Path, help="default: runs/boards/BOARD")
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / "boards" / args.board
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"not on the boards: {', '.join(unknown)}; the boards' models: {', '.join(MODELS)}")
    parts = [command(args.board, group, out, args.seeds) for group in groups(args.jobs, names)]
    final = command(args.board, names, out, args.seeds)
    if args.print:
        for cmd in [*parts, final]:
            print("OMP_NUM_THREADS=1 " + shlex.join(cmd))
        return
    if not DATA[args.board][1].exists():
        sys.exit(f"{DATA[args.board][1]} not found: the boards need ../shared/data beside the checkout")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(out / f"group{i}.log", "a") for i in range(len(parts))]
    jobs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(parts, logs)]
    failed = [i for i, job in enumerate(jobs) if job.wait() != 0]
    if failed:
        sys.exit(f"group(s) {failed} failed: see {out}/group*.log; run the same command again to continue")
    subprocess.run(final, env=env, check=True)
    print(out / "leaderboard.md")


if __name__ == "__main__":
    main()
