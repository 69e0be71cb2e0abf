"""train() writes a complete run folder, resumes a killed run where it stopped, and load_run() rebuilds it safely."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aeflow.errors import CheckpointError, ConfigError
from aeflow.training import PRESETS, TrainConfig, load_checkpoint, load_run, train
from aeflow.training.checkpoint import newest_valid_checkpoint


def tiny_config(**overrides) -> dict:
    """A few-second AE-FLOW: random-init ResNet-18 (no weight files needed), 2 flow steps, 64 px phantoms."""
    config = {
        "model": "aeflow",
        "model_kwargs": {"backbone": "resnet18", "pretrained": False, "flow_steps": 2, "subnet": "conv",
                         "decoder_widths": [32, 16, 8]},
        "data": {"layout": "synthetic", "n_train": 16, "n_val": 8, "n_test": 4},
        "image_size": 64,
        "batch_size": 8,
        "max_epochs": 2,
        "progress_bar": False,
    }
    config.update(overrides)
    return config


def test_run_folder_holds_everything_and_loads_back(tmp_path):
    run = train(tiny_config(), tmp_path / "run")
    for name in ("config.json", "splits.json", "train.log", "model.safetensors", "curves/metrics.csv",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["seed"] == 0 and config["train"]["max_epochs"] == 2
    assert {"python", "torch", "lightning", "aeflow"} <= set(config["versions"])
    assert config["model_config"]["backbone"] == "resnet18"
    log = (run / "train.log").read_text()
    assert "epoch 1" in log and "GPU available" in log  # lightning's own lines still reach the log...
    assert "litlogger" not in log  # ...but not its advertisement
    assert "val_loss" in (run / "curves/metrics.csv").read_text().splitlines()[0]

    model, loaded_config = load_run(run)
    assert loaded_config == config
    assert bool(model.calibrated) and model.score_std.min() > 0  # calibration travelled with the weights
    again, _ = load_run(run)
    images = torch.rand(2, 1, 64, 64)
    first, second = model.predict(images), again.predict(images)
    assert torch.equal(first["pred_score"], second["pred_score"])

    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(), run)


def test_load_run_refuses_a_tampered_model_file(tmp_path):
    run = train(tiny_config(max_epochs=1), tmp_path / "run")
    marker = tmp_path / "payload_ran"
    source = f"import os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
    namespace: dict = {}
    exec(source, namespace)
    torch.save({"state_dict": namespace["P"]()}, run / "model.safetensors")
    with pytest.raises(CheckpointError):
        load_run(run)
    assert not marker.exists()


def test_resume_refuses_a_changed_config(tmp_path):
    run = train(tiny_config(max_epochs=1), tmp_path / "run")
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_config(max_epochs=2, lr=0.5), run, resume=True)


_CHILD = """
from aeflow.training import train
train({config}, {run!r})
"""


def test_resume_rebuilds_the_model_the_run_recorded_not_todays_defaults(tmp_path):
    """A run resumed after its model's defaults changed gets the model it started with, as load_run does: GANomaly's
    `blocks` came after runs were saved with the plain-convolution networks (their config.json has no such key),
    and a default that changed since (here `latent_channels`, as if it had been 4 then) is read from the record."""
    config = {"model": "ganomaly", "model_kwargs": {"widths": [8, 16], "latent_channels": 4, "blocks": "conv"},
              "data": {"layout": "synthetic", "n_train": 16, "n_val": 8, "n_test": 4}, "image_size": 32,
              "batch_size": 8, "max_epochs": 1, "progress_bar": False}
    run = train(config, tmp_path / "run")
    document = json.loads((run / "config.json").read_text())
    del document["model_config"]["blocks"]  # as written before the option was added
    document["train"]["model_kwargs"] = {"widths": [8, 16]}  # the rest were defaults when the run started
    (run / "config.json").write_text(json.dumps(document))
    train({**config, "model_kwargs": {"widths": [8, 16]}, "max_epochs": 2}, run, resume=True)
    assert load_checkpoint(run / "checkpoints" / "last.safetensors")["epoch"] == 1
    model, _ = load_run(run)
    assert model.config()["blocks"] == "conv" and model.config()["latent_channels"] == 4


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    epochs, n_train, batch = 6, 48, 8
    config = tiny_config(max_epochs=epochs, data={"layout": "synthetic", "n_train": n_train, "n_val": 8, "n_test": 4},
                         batch_size=batch)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.safetensors"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(config=repr(config), run=str(run))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert last.exists(), "the child wrote no checkpoint"
        assert child.poll() is None, "the child finished before it could be killed: make its epochs longer"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    steps_per_epoch = n_train // batch
    # Both checkpoints are whole (atomic writes); a kill between an epoch's `best` and `last` writes leaves `best`
    # one epoch further, and the resume continues from whichever is furthest.
    before = load_checkpoint(newest_valid_checkpoint([last, last.with_name("best.safetensors")]))
    assert before["global_step"] == (before["epoch"] + 1) * steps_per_epoch < epochs * steps_per_epoch

    train(config, run, resume=True)
    after = load_checkpoint(last)
    assert after["epoch"] == epochs - 1
    assert after["global_step"] == epochs * steps_per_epoch
    log = (run / "train.log").read_text()
    assert f"epoch {before['epoch'] + 1} done, global step {before['global_step']}" in log
    assert "training stopped after epoch 6" in log
    assert (run / "model.safetensors").is_file()
    # The curves hold every epoch once: those before the kill were kept through the resume.
    with open(run / "curves" / "metrics.csv", newline="") as f:
        validated = [int(row["epoch"]) for row in csv.DictReader(f) if row["val_loss"]]
    assert validated == list(range(epochs))
    assert not (run / "curves" / "metrics.before_resume.csv").exists()


def test_resume_falls_back_to_best_when_last_is_torn(tmp_path):
    run = train(tiny_config(max_epochs=2, select_on="val_loss"), tmp_path / "run")
    last = run / "checkpoints" / "last.safetensors"
    best_epoch = load_checkpoint(run / "checkpoints" / "best.safetensors")["epoch"]
    last.write_bytes(last.read_bytes()[:1000])  # a kill in the middle of writing it
    train(tiny_config(max_epochs=3, select_on="val_loss"), run, resume=True)
    log = (run / "train.log").read_text()
    assert f"best.safetensors: epoch {best_epoch + 1} done" in log
    assert load_checkpoint(last)["epoch"] == 2


def test_presets_and_options():
    paper = TrainConfig.from_dict({"preset": "paper"})
    assert (paper.lr, paper.weight_decay, paper.max_epochs, paper.image_size) == (2e-3, 1e-5, 100, 256)
    assert paper.model_kwargs == {"backbone": "wide_resnet50_2", "freeze_encoder": True, "flow_steps": 8,
                                  "subnet": "resnet", "decoder_widths": [512, 256, 64], "alpha": 0.5,
                                  "beta": 0.9, "score_mode": "paper",
                                  "feature_norm": "channel", "stages": [16], "decoder": "transposed",
                                  "map_mode": "residual", "reference": "none"}
    assert paper.select_on == "val_loss"
    chest = TrainConfig.from_dict({"preset": "paper_chest_xray", "model_kwargs": {"flow_steps": 4}})
    assert chest.lr == 1e-3 and chest.model_kwargs["subnet"] == "conv" and chest.model_kwargs["flow_steps"] == 4
    assert PRESETS["paper"]["model_kwargs"]["flow_steps"] == 8  # the preset itself is not modified
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig.from_dict({"preset": "nope"})


def test_curves_survive_two_resumes(tmp_path):
    """A crash during a resumed fit: the next resume still finds the first part of the curves."""
    from aeflow.training.curves import Curves

    def write(epochs):
        with open(tmp_path / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "val_loss"])
            writer.writeheader()
            writer.writerows({"epoch": e, "val_loss": 1.0 / (e + 1)} for e in epochs)

    curves = Curves(tmp_path)
    write([0, 1, 2])  # killed during epoch 2 (its row stands for a partial epoch's log)
    curves.set_aside(epochs_done=2)
    write([2, 3])  # the resumed fit, killed again during epoch 3
    curves.set_aside(epochs_done=3)
    write([3, 4])  # the second resume finishes
    curves.merge()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "metrics.before_resume.csv").exists()


def test_curves_file_is_whole_when_a_save_is_killed(tmp_path, monkeypatch):
    """A save that grows the columns rewrites the file: killed in the middle, the previous rows must still be there
    (lightning's own writer truncates the file in place first, and a kill there lost the first epoch's rows)."""
    from aeflow.training.curves import CurvesLogger

    logger = CurvesLogger(tmp_path)
    logger.log_metrics({"train_loss_step": 1.0, "epoch": 0}, step=0)
    logger.log_metrics({"val_loss": 0.5, "epoch": 0}, step=5)
    logger.save()
    path = tmp_path / "curves" / "metrics.csv"
    before = path.read_text()
    logger.log_metrics({"train_loss_epoch": 0.9, "epoch": 0}, step=5)  # a new column: the whole file is written

    def killed(self, rows):
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    monkeypatch.undo()
    assert path.read_text() == before
    logger.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["val_loss"], row["train_loss_epoch"]) for row in rows] == [("", ""), ("0.5", ""), ("", "0.9")]


def test_kept_epoch_and_blend_weights_never_see_test_labels(tmp_path):
    """Two runs on the same training and validation images, one with every test label flipped: what is chosen on
    validation (the kept epoch, its criterion value, AE-FLOW's blend weights) must come out the same. With 20 + 20
    labelled validation images both choices are made on validation AUROC here, so the test exercises them."""
    import dataclasses

    from aeflow.data import DataSplits, load_data

    data_options = {"layout": "synthetic", "n_train": 16, "n_val": 40, "n_test": 12}
    data = load_data(image_size=64, seed=0, **data_options)
    flipped = dataclasses.replace(data.records, test=[dataclasses.replace(r, label=1 - r.label) for r in data.records.test])
    swapped = DataSplits.from_records(flipped, image_size=64, channels=1)
    config = tiny_config(max_epochs=3, data=data_options)
    chosen = []
    for name, splits in (("plain", data), ("flipped", swapped)):
        run = train(config, tmp_path / name, data=splits)
        chosen.append(json.loads((run / "selection.json").read_text()))
    assert chosen[0]["criterion"] == "val_image_AUROC" and set(chosen[0]["blend_weights"]) >= {"score_flow_nll"}
    assert chosen[0] == chosen[1]


def test_semi_supervised_gamma_and_types_never_see_test_labels(tmp_path):
    """The same for AE-FLOW-GMM trained with 6 labelled phantoms: gamma (chosen on the 20 + 20 labelled validation
    images) and the rest of the selection come out the same with every test label flipped, and the mixture has a
    component per labelled lesion type, recorded in the run's config."""
    import dataclasses

    from aeflow.data import DataSplits, load_data

    data_options = {"layout": "synthetic", "n_train": 16, "n_val": 40, "n_test": 12}
    data = load_data(image_size=64, seed=0, labelled_anomalies=6, **data_options)
    flipped = dataclasses.replace(data.records, test=[dataclasses.replace(r, label=1 - r.label) for r in data.records.test])
    swapped = DataSplits.from_records(flipped, image_size=64, channels=1)
    config = tiny_config(model="aeflow_gmm", max_epochs=2, data=data_options, labelled_anomalies=6)
    chosen = []
    for name, splits in (("plain", data), ("flipped", swapped)):
        run = train(config, tmp_path / name, data=splits)
        chosen.append(json.loads((run / "selection.json").read_text()))
    assert "gamma" in chosen[0]["blend_weights"]
    assert chosen[0] == chosen[1]
    types = json.loads((tmp_path / "plain" / "config.json").read_text())["model_config"]["anomaly_types"]
    assert types == sorted({r.anomaly_type for r in data.records.labelled}) and types
