"""`aeflow train` as a user meets it: a config file, repeating a run from its folder, an experiment logger, one
readable line per epoch (also in a log file), the next command at the end, and nothing left by a failed start."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from aeflow.cli import app
from aeflow.training.console import NarrowProgressBar, epoch_line

TINY = """\
data: synthetic
option: {n_train: 16, n_val: 8, n_test: 4}
backbone: resnet18
model_option: {pretrained: false, flow_steps: 2, subnet: conv, decoder_widths: [32, 16, 8]}
image_size: 64
batch_size: 8
epochs: 2
accelerator: cpu
"""


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def first_epoch_loss(run: Path) -> float:
    with open(run / "curves" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss_epoch")]
    assert rows[0]["epoch"] == "0"
    return float(rows[0]["train_loss_epoch"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny AE-FLOW run trained from a YAML file through the command line (about 2 s)."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "run.yaml").write_text(TINY)
    result = invoke("--config", str(folder / "run.yaml"), "--runs", str(folder / "runs"), "--name", "a", "--seed", "3")
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_epoch_lines_fit_80_columns_and_count_from_one():
    line = epoch_line(0, 2, {"train_loss_epoch": 1.23456, "val_loss": 0.98765, "val_image_AUROC": 0.8125,
                             "v_num": 3.0}, seconds=12.34)
    assert line == "epoch 1/2  train_loss 1.235  val_loss 0.9877  val_AUROC 0.812  12.3 s"
    assert len(epoch_line(999, 1000, {"train_loss_epoch": -1.2345e-5, "val_loss": -123.456, "val_image_AUROC": 1},
                          seconds=9000.0)) <= 80


def test_the_progress_bar_says_epoch_k_of_n_and_holds_no_metrics():
    bar = NarrowProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=2)
    assert bar._get_train_description(0).strip() == "epoch 1/2"
    assert bar._get_train_description(1).strip() == "epoch 2/2"
    assert bar.get_metrics(None, None) == {}  # no v_num, no metrics wrapping onto lines of their own


def test_training_output_is_one_plain_line_per_epoch_and_ends_with_the_next_steps(first_run):
    folder, output = first_run
    lines = output.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], output
    assert all("val_loss" in line and "val_AUROC" in line and len(line) <= 80 for line in epochs)
    assert "v_num" not in output and "Epoch 0" not in output and "\r" not in output  # no bar frames in a pipe
    run = folder / "runs" / "a"
    assert f"next: aeflow test --run {run}" in output and f"aeflow predict --run {run}" in output
    assert "seed: 3" in output and "max_epochs: 2" in output  # the resolved config, printed at the start


def test_a_run_repeats_from_its_folder_with_the_same_config_and_first_epoch_loss(first_run):
    folder, _ = first_run
    runs = folder / "runs"
    result = invoke("--from", str(runs / "a"), "--runs", str(runs))
    assert result.exit_code == 0, result.output
    original, repeat = runs / "a", runs / "a-repeat"
    assert json.loads((repeat / "config.json").read_text()) == json.loads((original / "config.json").read_text())
    assert first_epoch_loss(repeat) == first_epoch_loss(original)
    # a flag given with --from changes that field only; so does one given with --config (file < command line)
    changed = invoke("--from", str(original), "--runs", str(runs), "--name", "b", "--epochs", "1", "-m", "flow_steps=1")
    assert changed.exit_code == 0, changed.output
    a, b = (json.loads((runs / n / "config.json").read_text())["train"] for n in ("a", "b"))
    assert b["max_epochs"] == 1 and b["model_kwargs"]["flow_steps"] == 1
    assert {k: v for k, v in b.items() if k not in ("max_epochs", "model_kwargs")} == \
        {k: v for k, v in a.items() if k not in ("max_epochs", "model_kwargs")}
    assert {**a["model_kwargs"], "flow_steps": 1} == b["model_kwargs"]


def test_config_file_mistakes_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 2\nepoch: 3\n")
    result = invoke("--config", str(tmp_path / "bad.yaml"), "--runs", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "unknown option(s) epoch" in result.output
    (tmp_path / "broken.yaml").write_text("epochs: [2\n")
    result = invoke("--config", str(tmp_path / "broken.yaml"), "--runs", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "cannot read it as YAML" in result.output
    result = invoke("--from", str(tmp_path / "nowhere"), "--runs", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "no such file" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_reused_name_points_at_the_resume_flag(first_run):
    folder, _ = first_run
    result = invoke("--config", str(folder / "run.yaml"), "--runs", str(folder / "runs"), "--name", "a")
    assert result.exit_code == 2 and "--resume" in result.output and "resume=True" not in result.output.split(
        "(")[0]


def test_a_failed_start_leaves_no_run_folder_behind(tmp_path):
    """A start that fails before config.json exists removes the folder it made (it held only train.log, and
    blocked the name); a folder the user made beforehand is kept."""
    for existed in (False, True):
        run = tmp_path / "runs" / f"bad-{existed}"
        if existed:
            run.mkdir(parents=True)
        result = invoke("--data", "folder", "--root", str(tmp_path / "missing"), "--runs", str(tmp_path / "runs"),
                        "--name", run.name, "--accelerator", "cpu")
        assert result.exit_code == 2, result.output
        assert run.exists() is existed


def test_tensorboard_logger_writes_event_files_beside_the_csv_curves(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "run.yaml").write_text(TINY.replace("epochs: 2", "epochs: 1"))
    result = invoke("--config", str(tmp_path / "run.yaml"), "--runs", str(tmp_path), "--name", "tb",
                    "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert first_epoch_loss(tmp_path / "tb") > 0
    assert json.loads((tmp_path / "tb" / "config.json").read_text())["train"]["logger"] == "tensorboard"


def test_a_logger_whose_package_is_missing_is_refused_before_anything_is_written(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mlflow"):
        pytest.skip("mlflow is installed here")
    result = invoke("--logger", "mlflow", "--runs", str(tmp_path), "--name", "m")
    assert result.exit_code == 2 and "pip install mlflow-skinny" in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_config_json_records_the_installed_freia_version(first_run):
    from importlib.metadata import version

    folder, _ = first_run
    versions = json.loads((folder / "runs" / "a" / "config.json").read_text())["versions"]
    assert versions["FrEIA"] == version("FrEIA") != "unknown"  # the same string the report's table shows


def test_version_and_a_line_per_model():
    import aeflow
    from aeflow.models import available_models

    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"aeflow {aeflow.__version__}"
    listing = CliRunner().invoke(app, ["models"])
    lines = listing.output.splitlines()
    assert listing.exit_code == 0 and [line.split()[0] for line in lines] == available_models()
    assert all(len(line) <= 80 for line in lines)
    by_name = {line.split()[0]: line for line in lines}
    assert "weights: wide_resnet50_2" in by_name["aeflow"] and "AE-FLOW (Zhao" in by_name["aeflow"]
    assert "no weights needed" in by_name["ae"]
