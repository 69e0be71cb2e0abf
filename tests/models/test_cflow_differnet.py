"""CFlow-AD and DifferNet on the synthetic phantoms (EfficientNet-Lite0, real packaged weights, offline).

Both are held to the image AUROC bound of test_baselines (0.7, justified there). Measured at these budgets, seeds
0 / 1 / 2 (torch and numpy, see seed_all), one thread:
- CFlow, 128 px, 4 steps per scale, 80 Adam steps at lr 2e-3 (~25 s): image AUROC (max of the map) 0.81 / 0.79 /
  0.86 on 20 vs 20 (0.89-0.90 on a separate draw of 100 vs 100), pixel AUROC 0.95-0.96. At 64 px the stride-8 and
  -16 maps (8 x 8, 4 x 4) are too coarse for the lesions: image AUROC 0.61-0.68, so only the pixel AUROC was held
  to a bound before.
- DifferNet, 64 px, the paper's 8 flow steps, all 8 dihedral test transforms, 256 training images, 120 Adam steps at
  lr 2e-3 (~25 s): image AUROC 0.77 / 0.85 / 0.87 on 50 vs 50 test images (0.83-0.84 on a separate draw of 100 vs
  100). DifferNet scores a global descriptor (pooled features), in which a lesion is a small change: with 64
  training images the flow overfits (0.68-0.73, falling with training), and its true AUROC (~0.8) on 20 vs 20
  images spread 0.70-0.82 over seeds, too close to the bound, hence the larger training and test sets (null sd
  0.058 for 50 vs 50). Its gradient map does NOT localise the lesions here (pixel AUROC 0.40-0.45: the gradient is
  largest at the brain's outline), so it is not asserted. The likelihood itself is checked too: held-out normal
  NLL drops with training and stays below the lesion NLL.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_baselines import as_batch, phantom_split, seed_all, train

from aeflow.errors import ConfigError
from aeflow.models import create_model
from aeflow.models import cflow, differnet  # noqa: F401 - registers them
from aeflow.models.cflow import positional_encoding_2d
from aeflow.models.differnet import dihedral

SMALL = {
    "cflow": dict(backbone="efficientnet_lite0", flow_steps=4, positions_per_step=1024),
    "differnet": dict(backbone="efficientnet_lite0", flow_steps=8, test_transforms=8),
}



def auroc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), scores.numpy()))


def check_outputs_and_rebuild(name: str, model, images: torch.Tensor, out: dict) -> None:
    n, _, h, w = images.shape
    assert out["pred_score"].shape == (n,) and out["anomaly_map"].shape == (n, h, w)
    assert all(torch.isfinite(v).all() for v in out.values())
    rebuilt = create_model(name, **model.config())
    rebuilt.load_state_dict(model.state_dict())
    again = rebuilt.eval().predict(images[:4])
    torch.testing.assert_close(again["pred_score"], out["pred_score"][:4], rtol=1e-4, atol=1e-5)


def test_cflow_separates_and_localises_synthetic_lesions():
    data = phantom_split(128)
    seed_all(0)
    model = train(create_model("cflow", **SMALL["cflow"]), data["train"], steps=80, lr=2e-3)
    out = model.predict(data["test"])
    check_outputs_and_rebuild("cflow", model, data["test"], out)
    image_auroc = auroc(data["label"], out["pred_score"])
    lesion = data["label"] == 1
    pixel_auroc = auroc(data["mask"][lesion].flatten(), out["anomaly_map"][lesion].flatten())
    print(f"cflow: image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f}")
    assert image_auroc >= 0.7, image_auroc
    assert pixel_auroc >= 0.75, pixel_auroc


def test_differnet_separates_synthetic_lesions():
    data = phantom_split(64, n_train=256, n_test=50)
    normal, lesion = data["test"][data["label"] == 0], data["test"][data["label"] == 1]
    seed_all(0)
    model = create_model("differnet", **SMALL["differnet"])

    def nll(images: torch.Tensor) -> float:  # per dimension, untransformed images
        with torch.no_grad():
            x = model.descriptor(images)
            z, log_det = model.flow(x)
            return float(((0.5 * z.pow(2).sum(1) - log_det) / x.shape[1]).mean())

    with torch.no_grad():  # initialise the flow's ActNorm on the first training batch, as training would
        model.train().loss(as_batch(data["train"][:16]))
    before = nll(normal)
    train(model, data["train"], steps=120, lr=2e-3)
    after_normal, after_lesion = nll(normal), nll(lesion)
    out = model.predict(data["test"])
    check_outputs_and_rebuild("differnet", model, data["test"], out)
    image_auroc = auroc(data["label"], out["pred_score"])
    print(f"differnet: NLL normal {before:.3f} -> {after_normal:.3f}, lesion {after_lesion:.3f}; "
          f"image AUROC {image_auroc:.3f}")
    assert after_normal < before - 0.1 and after_normal < after_lesion, (before, after_normal, after_lesion)
    assert image_auroc >= 0.7, image_auroc


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["cflow", "differnet"])
def test_take_grayscale_colour_and_any_multiple_of_16(name, channels):
    model = create_model(name, backbone="resnet18", pretrained=False, flow_steps=2)
    for size in (32, 48):
        images = torch.rand(2, channels, size, size)
        assert torch.isfinite(model.train().loss(as_batch(images))["loss"])
        out = model.eval().predict(images)
        assert out["pred_score"].shape == (2,) and out["anomaly_map"].shape == (2, size, size)
        assert torch.isfinite(out["anomaly_map"]).all()


def test_differnet_scores_inside_inference_mode():
    """Lightning's test loop runs under inference_mode; the gradient map must still be computed there."""
    model = create_model("differnet", backbone="resnet18", pretrained=False, flow_steps=2, test_transforms=2).eval()
    images = torch.rand(2, 1, 32, 32)
    expected = model.predict(images)
    with torch.inference_mode():
        got = model.predict(images)
    torch.testing.assert_close(got["anomaly_map"], expected["anomaly_map"])
    assert expected["anomaly_map"].abs().sum() > 0


def test_dihedral_transforms_are_eight_distinct_and_start_with_identity():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    versions = [dihedral(x, k) for k in range(8)]
    assert torch.equal(versions[0], x)
    assert len({tuple(v.flatten().tolist()) for v in versions}) == 8


def test_positional_encoding_distinguishes_every_position():
    enc = positional_encoding_2d(128, 8, 8).flatten(1).T  # 64 positions x 128
    distances = torch.cdist(enc, enc) + torch.eye(64) * 1e3
    assert distances.min() > 0.1
    with pytest.raises(ConfigError):
        positional_encoding_2d(126, 4, 4)


def test_invalid_options_are_refused():
    with pytest.raises(ConfigError, match="test_transforms"):
        create_model("differnet", backbone="resnet18", pretrained=False, test_transforms=9)
    with pytest.raises(ConfigError, match="positions_per_step"):
        create_model("cflow", backbone="resnet18", pretrained=False, positions_per_step=0)
