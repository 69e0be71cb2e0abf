"""A tiny but real run folder, built the way training saves one, shared by the serving tests.

The model is a small AE-FLOW (random-init EfficientNet-Lite0 trunk, 2 flow steps, narrow decoder) at 64 px. It is
not trained: these tests check the plumbing (reading, scoring, exporting, serving), for which any fixed weights
do, and building it takes about a second instead of a training run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch

import aeflow.models.aeflow  # noqa: F401  (registers "aeflow")
from aeflow.data.synthetic import make_phantom
from aeflow.evaluation import ConformalFPR
from aeflow.models import create_model
from aeflow.training import TrainConfig, save_checkpoint
from aeflow.training.run import CONFIG_FILE, MODEL_FILE

IMAGE_SIZE = 64
MODEL_KWARGS = {"backbone": "efficientnet_lite0", "pretrained": False, "flow_steps": 2, "subnet": "conv",
                "decoder_widths": [32, 16, 8], "in_channels": 1}


@contextlib.contextmanager
def one_thread():
    """One intra-op torch thread: with pytest-xdist's two workers on two shared cores, more threads only spin
    against each other (a 64 px forward pass measured 0.01 s with one thread, 2.5 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    with one_thread():
        yield


def phantoms(n: int, *, seed: int = 0, anomaly: str = "good", size: int = IMAGE_SIZE) -> torch.Tensor:
    """n synthetic brain-slice phantoms, n x 1 x size x size in [0, 1]."""
    return torch.from_numpy(np.stack([make_phantom(seed, i, size=size, anomaly=anomaly)[0] for i in range(n)]))[:, None]


def build_run(run_dir, *, threshold: bool = True):
    """Write config.json, model.safetensors (and threshold.json) into run_dir, as training and `aeflow test` do."""
    torch.manual_seed(0)
    model = create_model("aeflow", **MODEL_KWARGS)
    with torch.no_grad():  # the first training step's forward pass fixes the flow's feature standardisation
        model.train()(phantoms(8, seed=1, size=IMAGE_SIZE))
    model.fit_reference([phantoms(32, seed=3, size=IMAGE_SIZE)])  # training images: not the calibration ones
    model.calibrate([phantoms(8, seed=1, size=IMAGE_SIZE)])
    model.eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.name, "config": model.config(), "state_dict": model.state_dict()},
                    run_dir / MODEL_FILE)
    config = TrainConfig(model="aeflow", model_kwargs=MODEL_KWARGS, data={"layout": "synthetic"},
                         image_size=IMAGE_SIZE, channels=1)
    (run_dir / CONFIG_FILE).write_text(json.dumps({"train": dataclasses.asdict(config),
                                                   "model_config": model.config()}))
    if threshold:
        scores = model.predict(phantoms(24, seed=2, size=IMAGE_SIZE))["pred_score"].numpy()
        fitted = ConformalFPR(alpha=0.1).fit(scores)
        (run_dir / "threshold.json").write_text(json.dumps(fitted.to_dict()))
    return run_dir


def write_dicom(path, pixels: np.ndarray):
    """A minimal DICOM file (Secondary Capture, uint16, MONOCHROME2): H x W, or frames x H x W for multi-frame."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.asarray(pixels, dtype=np.uint16), photometric_interpretation="MONOCHROME2", bits_stored=16)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    with one_thread():
        return build_run(tmp_path_factory.mktemp("run") / "tiny")
