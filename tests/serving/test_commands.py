"""The predict / export / serve verbs: they run, and a user's mistake is one red line with exit code 2."""

from __future__ import annotations

import csv

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from aeflow.serving.commands import register

from .conftest import phantoms


def cli() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


def test_predict_verb_writes_the_csv(run_dir, tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray((phantoms(1)[0, 0].numpy() * 255).astype(np.uint8)).save(image)
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = CliRunner().invoke(cli(), ["predict", "--run", str(run_dir), str(image.parent), "--out",
                                        str(tmp_path / "out"), "--no-overlays"])
    assert result.exit_code == 0, result.output
    assert "1 file(s) could not be read" in result.output
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert [row["path"] for row in csv.DictReader(f)] == [str(image)]


def test_user_errors_are_one_line_and_exit_code_2(run_dir, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli(), ["predict", "--run", str(tmp_path / "nope"), "a.png"])
    assert missing.exit_code == 2
    assert missing.output.strip().startswith("error: run folder") and "Traceback" not in missing.output
    bad_format = runner.invoke(cli(), ["export", "--run", str(run_dir), "--format", "tflite"])
    assert bad_format.exit_code == 2 and "unknown format" in bad_format.output
    for verb in ("predict", "export", "serve"):
        help_text = runner.invoke(cli(), [verb, "--help"]).output
        assert "--run" in help_text


def test_predict_of_nothing_readable_exits_non_zero_and_keeps_earlier_results(run_dir, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray((phantoms(1)[0, 0].numpy() * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli(), ["predict", "--run", str(run_dir), str(image), "--out", str(out)]).exit_code == 0
    before = (out / "predictions.csv").read_bytes()
    again = runner.invoke(cli(), ["predict", "--run", str(run_dir), str(tmp_path / "missing.png"), "--out", str(out)])
    assert again.exit_code == 2 and "already holds results" in again.output
    assert (out / "predictions.csv").read_bytes() == before
    empty = runner.invoke(cli(), ["predict", "--run", str(run_dir), str(tmp_path / "missing.png"), "--out",
                                  str(tmp_path / "new")])
    assert empty.exit_code == 2 and "nothing could be scored" in empty.output and "Traceback" not in empty.output
