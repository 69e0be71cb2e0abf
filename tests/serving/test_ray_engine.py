"""`predict_paths(engine="ray")` on a local Ray instance writes what the local engine writes, bad files included."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from PIL import Image

from aeflow.errors import BadFileError, ConfigError
from aeflow.serving.predict import predict_paths

from .conftest import phantoms, write_dicom


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """PNGs of normal and lesioned phantoms, a 3-frame DICOM, a truncated PNG and an empty DICOM file."""
    folder = tmp_path_factory.mktemp("archive")
    images = np.concatenate([phantoms(5, seed=3)[:, 0].numpy(), phantoms(4, seed=4, anomaly="bright_lesion")[:, 0].numpy()])
    for i, image in enumerate(images):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"scan{i:02d}.png")
    write_dicom(folder / "cine.dcm", (phantoms(3, seed=5)[:, 0].numpy() * 4000).astype(np.uint16))
    good = (folder / "scan00.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    (folder / "empty.dcm").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance with 2 CPUs, offline (no usage statistics), shut down after the module's tests."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        monkeypatch.undo()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_ray_with_two_workers_writes_what_the_local_engine_writes(ray_session, run_dir, archive, tmp_path):
    local = predict_paths(run_dir, [archive], tmp_path / "local", batch_size=3, progress=False)
    remote = predict_paths(run_dir, [archive], tmp_path / "ray", batch_size=3, progress=False, engine="ray", workers=2)
    assert ray_session.is_initialized()  # a session opened by the caller is left open

    rows, ray_rows = read_csv(local), read_csv(remote)
    assert len(rows) == 9 + 3
    key = ("path", "slice", "pred_label", "threshold", "threshold_rule", "overlay")
    assert [tuple(r[k] for k in key) for r in ray_rows] == [tuple(r[k] for k in key) for r in rows]
    scores, ray_scores = (np.array([float(r["pred_score"]) for r in table]) for table in (rows, ray_rows))
    np.testing.assert_allclose(ray_scores, scores, rtol=0, atol=1e-6)
    assert len(set(scores.round(6))) == len(scores)  # every image really scored, each its own score
    skipped = read_csv(tmp_path / "local" / "skipped.csv")
    assert sorted(s["path"] for s in skipped) == [str(archive / "broken.png"), str(archive / "empty.dcm")]
    assert read_csv(tmp_path / "ray" / "skipped.csv") == skipped
    for row in rows:
        ours, theirs = (np.asarray(Image.open(tmp_path / side / row["overlay"]), dtype=int) for side in ("local", "ray"))
        assert np.abs(ours - theirs).max() <= 1  # the same picture (a map value may round to the next colour)


@pytest.mark.slow
def test_ray_strict_stops_at_the_first_bad_file_keeping_earlier_rows(ray_session, run_dir, archive, tmp_path):
    with pytest.raises(BadFileError, match="broken.png"):
        predict_paths(run_dir, [archive / "scan00.png", archive / "broken.png", archive / "scan01.png"],
                      tmp_path / "out", batch_size=1, progress=False, engine="ray", workers=1, skip_bad=False)
    assert [r["path"] for r in read_csv(tmp_path / "out" / "predictions.csv")] == [str(archive / "scan00.png")]


def test_ray_engine_without_ray_says_how_to_install_it(run_dir, archive, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"aeflow\[distributed\]"):
        predict_paths(run_dir, [archive / "scan00.png"], tmp_path / "out", progress=False, engine="ray")
    assert not (tmp_path / "out" / "predictions.csv").exists()  # refused before anything is written


def test_unknown_engine_is_refused_before_anything_is_written(run_dir, archive, tmp_path):
    with pytest.raises(ConfigError, match="engine"):
        predict_paths(run_dir, [archive], tmp_path / "out", progress=False, engine="spark")
    assert not (tmp_path / "out").exists()


def test_predict_verb_takes_the_engine_options(run_dir, archive, tmp_path):
    import typer
    from typer.testing import CliRunner

    from aeflow.serving.commands import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    help_text = CliRunner().invoke(app, ["predict", "--help"]).output
    assert "--engine" in help_text and "--address" in help_text and "--workers" in help_text
    result = CliRunner().invoke(app, ["predict", "--run", str(run_dir), str(archive / "scan00.png"), "--out",
                                      str(tmp_path / "out"), "--engine", "spark"])
    assert result.exit_code == 2 and "engine must be one of" in result.output and "Traceback" not in result.output
