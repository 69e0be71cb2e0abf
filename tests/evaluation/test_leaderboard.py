"""`run_benchmark` trains every model on the same split and its leaderboard repeats the runs' own metrics."""

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from aeflow.errors import ConfigError
from aeflow.evaluation.leaderboard import benchmark_command, run_benchmark

TINY_DATA = {"layout": "synthetic", "n_train": 24, "n_val": 12, "n_test": 16, "size": 32}


@pytest.mark.slow
def test_two_models_two_seeds_make_one_leaderboard(tmp_path, monkeypatch):
    out = run_benchmark(
        ["ae", {"model": "padim"}], TINY_DATA, seeds=[0, 1], out_dir=tmp_path / "board", image_size=32,
        epochs=1, batch_size=8, model_kwargs={"ae": {"widths": [8, 16, 32, 64]},
                                              "padim": {"backbone": "efficientnet_lite0"}},
    )
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.json"):
        assert (out / name).is_file(), name

    with (out / "leaderboard.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"ae", "padim"}
    for model, row in rows.items():
        per_run = [json.loads((out / f"{model}-s{seed}" / "metrics.json").read_text()) for seed in (0, 1)]
        timings = [json.loads((out / f"{model}-s{seed}" / "benchmark.json").read_text()) for seed in (0, 1)]
        for key in ("image_AUROC", "image_AP", "image_F1", "image_SEN", "image_SPE", "pixel_AUROC", "pixel_AUPRO"):
            values = [m[key] for m in per_run]
            assert float(row[f"{key}_mean"]) == pytest.approx(sum(values) / 2), (model, key)
            assert float(row[f"{key}_std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2)), (model, key)
        for key in ("fit_seconds", "test_images_per_second", "peak_rss_mb"):
            assert float(row[f"{key}_mean"]) == pytest.approx(sum(t[key] for t in timings) / 2)
            assert all(t[key] > 0 for t in timings)
        assert row["n_seeds"] == "2"
    assert rows["padim"]["backbone"] == "efficientnet_lite0" and rows["padim"]["pretrained"] == "yes (frozen)"
    assert rows["ae"]["backbone"] == "none" and rows["ae"]["pretrained"] == "no"

    # Both models saw the same files for a seed, and the two seeds drew different phantoms.
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["same_split_per_seed"] == {"0": True, "1": True}
    assert board["splits_sha256"]["0"]["ae"] != board["splits_sha256"]["1"]["ae"]
    aurocs = [row["stats"]["image_AUROC"]["mean"] for row in board["rows"]]
    assert aurocs == sorted(aurocs, reverse=True)

    markdown = (out / "leaderboard.md").read_text()
    assert markdown.count("\n| ae |") + markdown.count("\n| padim |") == 2
    assert "pixel AUROC" in markdown and "for all 2 models" in markdown
    assert "<table>" in (out / "leaderboard.html").read_text()

    # A finished benchmark is reused, not retrained: the run folders are left as they were.
    def again():
        run_benchmark(["ae", {"model": "padim"}], TINY_DATA, seeds=[0, 1], out_dir=out, image_size=32, epochs=1,
                      batch_size=8, model_kwargs={"ae": {"widths": [8, 16, 32, 64]},
                                                  "padim": {"backbone": "efficientnet_lite0"}})

    stamps = {run: (out / run / "benchmark.json").stat().st_mtime_ns for run in ("ae-s0", "padim-s1")}
    again()
    assert {run: (out / run / "benchmark.json").stat().st_mtime_ns for run in stamps} == stamps

    # A run trained before a default of its model changed records the same train config but another model
    # config: it is refused, naming the option, rather than reused as if it were the current model.
    config_path = out / "ae-s1" / "config.json"
    document = json.loads(config_path.read_text())
    assert document["model_config"]["blur_sigma"] == 2.0  # the default now
    document["model_config"]["blur_sigma"] = 1.0
    config_path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"ae-s1 holds a run of the same config whose model has since changed "
                                          r"its defaults \(blur_sigma 1.0 -> 2.0\)"):
        again()
    # One saved before the option existed is rebuilt with the value older runs had (options_of_older_runs).
    del document["model_config"]["blur_sigma"]
    config_path.write_text(json.dumps(document))
    from aeflow.models.ae import AutoEncoder

    monkeypatch.setattr(AutoEncoder, "options_of_older_runs", {"blur_sigma": 2.0})
    again()
    monkeypatch.setattr(AutoEncoder, "options_of_older_runs", {"blur_sigma": 3.0})
    with pytest.raises(ConfigError, match=r"blur_sigma 3.0 -> 2.0"):
        again()


def test_per_model_options_that_would_change_the_split_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="same for every model"):
        run_benchmark([{"model": "ae", "seed": 3}], TINY_DATA, seeds=[0], out_dir=tmp_path, image_size=32,
                      epochs=1, batch_size=8)
    with pytest.raises(ConfigError, match="listed twice"):
        run_benchmark(["ae", "ae"], TINY_DATA, seeds=[0], out_dir=tmp_path, image_size=32, epochs=1, batch_size=8)
    with pytest.raises(ConfigError, match="not in the benchmark"):
        run_benchmark(["ae"], TINY_DATA, seeds=[0], out_dir=tmp_path, image_size=32, epochs=1, batch_size=8,
                      model_kwargs={"vae": {}})
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_command_line_routes_model_options(tmp_path, monkeypatch):
    import typer

    seen = {}
    monkeypatch.setattr("aeflow.evaluation.leaderboard.run_benchmark",
                        lambda models, data, **kwargs: seen.update(models=models, data=data, **kwargs))
    app = typer.Typer()
    app.command()(benchmark_command)
    (tmp_path / "leaderboard.md").write_text("| table |\n")
    result = CliRunner().invoke(app, [
        "--models", "aeflow,padim", "--data", "medmnist", "--root", "x.npz", "--seeds", "0,2", "--epochs", "3",
        "-m", "aeflow.preset=chest_xray", "-m", "aeflow.decoder_widths=[128,64,32]",
        "-m", "padim.backbone=efficientnet_lite0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["models"] == [
        {"model": "aeflow", "preset": "chest_xray", "model_kwargs": {"decoder_widths": [128, 64, 32]}},
        {"model": "padim", "model_kwargs": {"backbone": "efficientnet_lite0"}},
    ]
    assert seen["data"] == {"layout": "medmnist", "root": "x.npz"}
    assert seen["seeds"] == [0, 2] and seen["epochs"] == 3
    bad = CliRunner().invoke(app, ["--models", "ae", "-m", "vae.kl_weight=1", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "MODEL.key=value" in bad.output


def test_benchmark_refuses_a_misspelt_model_option_before_any_training(tmp_path):
    from typer.testing import CliRunner

    from aeflow.cli import app

    result = CliRunner().invoke(app, ["benchmark", "--models", "aeflow,padim", "--seeds", "0", "--out",
                                      str(tmp_path / "b"), "-m", "padim.backbon=efficientnet_lite0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "-m padim.*: model 'padim' has no option 'backbon'; its options are:" in result.output
    assert not (tmp_path / "b").exists()
