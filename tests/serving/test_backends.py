"""The fast inference path (aeflow.backends): every backend reproduces eager PyTorch on real images, a backend that
computes something else is refused, and "auto" picks by the measured speeds it is given."""

from __future__ import annotations

import json

import pytest
import torch

from aeflow import backends
from aeflow.backends import PARITY_TOLERANCE, make_predictor, parity_error
from aeflow.data import ImageDataset, Record
from aeflow.data.synthetic import ANOMALY_TYPES, phantom_source
from aeflow.errors import ConfigError
from aeflow.inference import predict_dataset
from aeflow.training import load_run

from .conftest import IMAGE_SIZE, build_run, phantoms

SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    loaded, _ = load_run(build_run(tmp_path_factory.mktemp("run") / "run"))
    return loaded.eval()


@pytest.mark.parametrize("backend", ["channels_last", "onnxruntime"])
def test_backend_matches_eager_on_phantoms(model, backend):
    pytest.importorskip("onnxruntime")
    images = torch.cat([phantoms(3, seed=5), phantoms(2, seed=6, anomaly=ANOMALY_TYPES[0])])
    predictor = make_predictor(model, SHAPE, backend=backend)
    with torch.no_grad():
        expected = model.predict(images)
    got = predictor(images)
    assert predictor.name == backend and predictor.report["backend"] == backend
    assert set(got) == set(expected)  # every output of predict: score, map, components, reconstruction
    assert parity_error(expected, got) <= PARITY_TOLERANCE
    assert not torch.equal(got["pred_score"], got["pred_score"].flip(0))  # real, different scores compared
    # a different batch size than the trace's example runs too (the batch size is free)
    one = predictor(images[:1])
    assert parity_error({k: v[:1] for k, v in expected.items()}, one) <= PARITY_TOLERANCE


class _MemoryFormatSensitive(torch.nn.Module):
    """A model whose predict gives another answer for NHWC inputs: channels-last must be refused for it."""

    def predict(self, images):
        shift = 0.0 if images.is_contiguous() else 1.0
        return {"pred_score": images.flatten(1).mean(1) + shift, "anomaly_map": images[:, 0] + shift}


def test_backend_that_differs_is_refused():
    model = _MemoryFormatSensitive()
    with pytest.raises(ConfigError, match="differ from eager"):
        make_predictor(model, (3, 16, 16), backend="channels_last")
    auto = make_predictor(model, (3, 16, 16), backend="auto", batch_size=2)
    assert auto.name != "channels_last"
    assert "differ from eager" in auto.report["candidates"]["channels_last"]["error"]


def test_auto_takes_the_fastest_only_beyond_the_margin(model, monkeypatch):
    pytest.importorskip("onnxruntime")
    speeds = {}
    monkeypatch.setattr(backends, "_images_per_second", lambda candidates, images: {k: speeds[k] for k in candidates})
    speeds.update(eager=100.0, channels_last=103.0, onnxruntime=90.0)  # 3 % is within the noise margin
    chosen = make_predictor(model, SHAPE, backend="auto", batch_size=4)
    assert chosen.name == "eager" and "no backend beat eager" in chosen.report["reason"]
    speeds.update(eager=100.0, channels_last=130.0, onnxruntime=250.0)
    chosen = make_predictor(model, SHAPE, backend="auto", batch_size=4)
    assert chosen.name == "onnxruntime" and chosen.report["timing_batch"] == 4
    assert chosen.report["candidates"]["channels_last"]["images_per_second"] == 130.0
    assert "2.50x eager" in backends.summary(chosen.report)


def test_unknown_backend_and_model_errors():
    with pytest.raises(ConfigError, match="backend must be one of"):
        make_predictor(_MemoryFormatSensitive(), (3, 16, 16), backend="tensorrt")


def test_predict_dataset_auto_equals_eager(model):
    data = ImageDataset([Record(phantom_source(4, i, IMAGE_SIZE, 0.5, ANOMALY_TYPES[0] if i % 2 else "good"), i % 2)
                         for i in range(6)], image_size=IMAGE_SIZE)
    eager = predict_dataset(model, data, batch_size=4, backend="eager")
    auto = predict_dataset(model, data, batch_size=4, backend="auto")
    assert eager.backend["backend"] == "eager"
    assert auto.backend["backend"] in backends.BACKENDS
    scale = abs(eager.pred_score).max()
    assert abs(auto.pred_score - eager.pred_score).max() <= PARITY_TOLERANCE * scale
    assert abs(auto.anomaly_map - eager.anomaly_map).max() <= PARITY_TOLERANCE * abs(eager.anomaly_map).max()
    json.dumps(auto.backend)  # the report is JSON as it is


class _ChunkedSearch(torch.nn.Module):
    """A predict with Python control flow that depends on the batch: rows are processed in chunks of 4, so a graph
    traced on a small batch holds one chunk and breaks (or drops rows) on a batch of more than 4."""

    def predict(self, images):
        rows = images.flatten(1)
        parts = [rows[start : start + 4].mean(1) for start in range(0, len(rows), 4)]
        score = torch.cat(parts)
        return {"pred_score": score, "anomaly_map": images[:, 0] * score.view(-1, 1, 1)}


def test_a_graph_frozen_at_a_small_batch_is_refused_at_the_callers_batch_size():
    pytest.importorskip("onnxruntime")
    images = backends.smooth_images(8, 3, (1, 16, 16))
    with pytest.raises(ConfigError, match="onnxruntime"):
        make_predictor(_ChunkedSearch(), (1, 16, 16), backend="onnxruntime", batch_size=8)
    auto = make_predictor(_ChunkedSearch(), (1, 16, 16), backend="auto", batch_size=8)
    assert auto.name != "onnxruntime" and "error" in auto.report["candidates"]["onnxruntime"]
    assert parity_error(_ChunkedSearch().predict(images), auto(images)) <= PARITY_TOLERANCE


def test_a_backend_that_fails_at_run_time_falls_back_to_eager_with_a_warning():
    """Checked at batch 2, then given a batch of 8: the chosen onnxruntime graph fails, that batch and the later
    ones run eagerly, and the report says so."""
    pytest.importorskip("onnxruntime")
    speeds = {"eager": 1.0, "channels_last": 1.0, "onnxruntime": 10.0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_images_per_second", lambda candidates, images: {k: speeds[k] for k in candidates})
        chosen = make_predictor(_ChunkedSearch(), (1, 16, 16), backend="auto", batch_size=2)
    assert chosen.name == "onnxruntime"
    images = backends.smooth_images(8, 3, (1, 16, 16))
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        got = chosen(images)
    assert parity_error(_ChunkedSearch().predict(images), got) <= PARITY_TOLERANCE
    assert chosen.report["fell_back"]["batch"] == 8
    assert parity_error(_ChunkedSearch().predict(images[:5]), chosen(images[:5])) <= PARITY_TOLERANCE
