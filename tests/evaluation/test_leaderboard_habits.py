"""The leaderboard's "same split" hash is taken of the file lists (equal lists, equal hashes, whatever the seed),
and `aeflow benchmark --intensity` reaches every model's data options."""

from __future__ import annotations

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from aeflow.data import save_splits
from aeflow.data.layouts import build_records
from aeflow.evaluation.leaderboard import benchmark_command, split_lists_sha256



def write_images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{name}.png")


def test_equal_file_lists_give_equal_hashes_whatever_the_seed(tmp_path):
    data = tmp_path / "data"
    write_images(data / "train" / "normal", [f"t{i}" for i in range(4)])
    write_images(data / "val" / "normal", ["v0"]), write_images(data / "val" / "abnormal", ["v1"], seed=2)
    write_images(data / "test" / "normal", ["s0"]), write_images(data / "test" / "abnormal", ["s1"], seed=3)
    for seed in (0, 1):  # a ready-made split: the same lists for both seeds
        save_splits(build_records("folder", data, seed=seed)[0], tmp_path / f"run-s{seed}")
    assert (tmp_path / "run-s0" / "splits.json").read_bytes() != (tmp_path / "run-s1" / "splits.json").read_bytes()
    assert split_lists_sha256(tmp_path / "run-s0") == split_lists_sha256(tmp_path / "run-s1")
    # carving by the seed gives other lists, and other hashes
    for seed in (0, 1):
        save_splits(build_records("folder", data / "train", seed=seed, split="carve", test_fraction=0.5)[0],
                    tmp_path / f"carved-s{seed}")
    assert split_lists_sha256(tmp_path / "carved-s0") != split_lists_sha256(tmp_path / "carved-s1")


def test_benchmark_passes_the_intensity_rule_to_every_model(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("aeflow.evaluation.leaderboard.run_benchmark",
                        lambda models, data, **kwargs: seen.update(data=data))
    app = typer.Typer()
    app.command()(benchmark_command)
    (tmp_path / "leaderboard.md").write_text("| table |\n")
    args = ["--models", "ae", "--data", "medmnist", "--root", "x.npz", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, [*args, "--intensity", "percentile:1,99"]).exit_code == 0
    assert seen["data"]["intensity"] == "percentile:1,99"
    assert CliRunner().invoke(app, args).exit_code == 0 and "intensity" not in seen["data"]  # reuse stays possible
    bad = CliRunner().invoke(app, [*args, "--intensity", "brightest"])
    assert bad.exit_code == 2 and "unknown intensity rule" in bad.output


def test_the_benchmark_orchestration_does_not_import_the_command_line():
    import subprocess
    import sys

    code = ("import sys, aeflow.evaluation.leaderboard as board; board.benchmark_command; "
            "print('aeflow.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
