"""ONNX export of AE-FLOW: onnxruntime reproduces PyTorch's scores and maps, at any batch size, threshold included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeflow.serving.export import ExportError, OnnxScorer, _ScoringGraph, check_parity, export_onnx
from aeflow.serving.runtime import LoadedRun

from .conftest import IMAGE_SIZE, phantoms


@pytest.fixture(scope="module")
def loaded(run_dir):
    return LoadedRun(run_dir)


@pytest.fixture(scope="module")
def onnx_path(loaded, tmp_path_factory):
    from .conftest import one_thread

    with one_thread():
        return export_onnx(loaded.run_dir, tmp_path_factory.mktemp("export") / "tiny.onnx", run=loaded)


def test_onnx_scores_equal_pytorch_scores(loaded, onnx_path):
    images = torch.cat([phantoms(3, seed=8), phantoms(2, seed=9, anomaly="bright_lesion")])
    expected = loaded.score(images)
    got = OnnxScorer(onnx_path).predict(images.numpy())
    torch_scores = np.array([r.pred_score for r in expected])
    torch_maps = np.stack([r.anomaly_map for r in expected])
    assert got["pred_score"].shape == (5,) and got["anomaly_map"].shape == (5, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(got["pred_score"] - torch_scores).max() <= 1e-4 * np.abs(torch_scores).max()
    assert np.abs(got["anomaly_map"] - torch_maps).max() <= 1e-4 * np.abs(torch_maps).max()
    assert got["pred_label"].tolist() == [r.pred_label for r in expected]


def test_onnx_metadata_and_input_checks(loaded, onnx_path):
    scorer = OnnxScorer(onnx_path)
    assert (scorer.image_size, scorer.channels) == (IMAGE_SIZE, 1)
    assert scorer.threshold == pytest.approx(loaded.threshold.value)
    assert scorer.metadata["threshold_rule"] == loaded.threshold.rule
    assert scorer.metadata["intensity"] == loaded.intensity
    single = scorer.predict(phantoms(1)[:, 0].numpy())  # N x H x W is accepted for one-channel models
    assert single["pred_score"].shape == (1,)
    with pytest.raises(Exception, match="resize them first"):
        scorer.predict(np.zeros((1, 1, 32, 32), np.float32))


def test_parity_check_rejects_a_graph_that_differs(loaded, onnx_path):
    class Shifted(_ScoringGraph):
        def forward(self, image):
            score, anomaly_map = super().forward(image)
            return score + 1e-2 * score.abs().max(), anomaly_map

    shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    assert check_parity(_ScoringGraph(loaded.model).eval(), OnnxScorer(onnx_path), shape) <= 1e-4
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(Shifted(loaded.model).eval(), OnnxScorer(onnx_path), shape)
