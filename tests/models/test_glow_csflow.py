"""Glow (a flow on the image) and CS-Flow (a cross-scale flow on frozen EfficientNet-Lite0 features).

Both flows invert, and their log-determinants equal that of the brute-force Jacobian on a tiny input (float64,
parameters perturbed off their identity initialisation so that every coupling does something). Trained for seconds
on the synthetic phantoms, both are held to the image AUROC bound of test_baselines (0.7 on 20 vs 20 test images,
more than two null standard deviations above chance, justified there) and to its pixel AUROC bound (0.75).
Measured at these budgets, seeds 0 / 1 (torch and numpy, see seed_all), one thread, shared 2-core Xeon:
- Glow, 32 px, 2 levels x 4 steps, 32 hidden channels, 300 Adam steps at lr 2e-3: image AUROC (bits/dim) 0.810,
  pixel AUROC 0.93 in this test (seed 0); 0.795 / 0.807 and 0.93 / 0.89 for seeds 0 / 1 in a loop without the
  initial actnorm pass. At 100 steps with 2 x 2 steps and 16 channels: 0.65 / 0.67, below the bound. Held-out normal
  images go from 7.87 to 5.53 bits/dim.
- CS-Flow, 96 px (maps 24 x 24, 12 x 12, 6 x 6, the paper's sizes), 2 coupling blocks, 32 hidden channels, 60 Adam
  steps at lr 2e-3: image AUROC (mean z^2) 0.877 / 0.860, pixel AUROC (finest scale) 0.86 / 0.86. At 64 px
  (16 x 16 / 8 x 8 / 4 x 4) with 60 steps: 0.64 / 0.69; at 128 px with 80 steps: 0.81 (seed 0), four times slower.
Both trainings take 25-60 s on one free core (1-2 minutes with the cores shared), hence `slow`.
"""

from __future__ import annotations

import pytest
import torch
from test_baselines import as_batch, auroc, phantom_split, seed_all, train

from aeflow.errors import ConfigError, DataError
from aeflow.models import create_model
from aeflow.models import csflow, glow  # noqa: F401 - registers them
from aeflow.models.csflow import CrossScaleFlow
from aeflow.models.glow import Glow

slow = pytest.mark.slow

GLOW_SMALL = dict(levels=2, steps=4, hidden_channels=32)
CSFLOW_SMALL = dict(backbone="efficientnet_lite0", coupling_blocks=2, hidden_channels=32)


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its (identity) initialisation, so the invertibility tests test something."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def brute_force_log_det(function, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(function, x)
    sign, log_abs = torch.linalg.slogdet(jacobian)
    assert sign != 0
    return float(log_abs)


def test_glow_inverts_and_its_log_det_is_the_jacobians():
    seed_all(0)
    model = Glow(in_channels=1, levels=2, steps=2, hidden_channels=8).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model.train().loss(as_batch(x))  # initialises every actnorm from this batch
    perturb(model)
    model.eval()
    y = model.dequantize(x)
    with torch.no_grad():
        latents, log_dets, _ = model.encode(y)
    assert [tuple(z.shape[1:]) for z in latents] == [(2, 4, 4), (8, 2, 2)]  # 64 dims in all, as in the image
    torch.testing.assert_close(model.decode(latents), y, atol=1e-10, rtol=0)

    def flat_latents(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in model.encode(v.view(1, 1, 8, 8))[0]])

    expected = brute_force_log_det(flat_latents, y[:1].flatten())
    got = float(sum(d[0].sum() for d in log_dets))
    assert abs(got) > 1.0  # the perturbed flow is far from volume-preserving
    assert got == pytest.approx(expected, abs=1e-8)


def test_glow_inverts_in_float32_at_board_size():
    seed_all(1)
    model = Glow(in_channels=3, levels=3, steps=2, hidden_channels=16)
    x = torch.rand(2, 3, 32, 32)
    model.train().loss(as_batch(x))
    perturb(model, 0.05)
    y = model.eval().dequantize(x)
    torch.testing.assert_close(model.decode(model.encode(y)[0]), y, atol=1e-4, rtol=0)


def test_csflow_inverts_and_its_log_det_is_the_jacobians():
    seed_all(0)
    flow = CrossScaleFlow([4, 6, 4], blocks=2, hidden=8, clamp=3.0).double()
    shapes = [(4, 4, 4), (6, 2, 2), (4, 1, 1)]
    xs = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    flow.train()(xs)  # initialises the actnorms
    perturb(flow)  # also makes the cross-convolutions' gammas non-zero: scales now talk to each other
    flow.eval()
    with torch.no_grad():
        zs, log_det = flow(xs)
    for back, x in zip(flow.inverse(zs), xs):
        torch.testing.assert_close(back, x, atol=1e-10, rtol=0)

    def flat(v: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            parts.append(v[start : start + n].view(1, *s))
            start += n
        return torch.cat([z.flatten() for z in flow(parts)[0]])

    expected = brute_force_log_det(flat, torch.cat([x[:1].flatten() for x in xs]))
    assert float(log_det[0]) == pytest.approx(expected, abs=1e-8)

    # Cross-scale: the finest scale's latent depends on the coarsest scale's input.
    jacobian = torch.autograd.functional.jacobian(flat, torch.cat([x[:1].flatten() for x in xs]))
    assert jacobian[:64, -4:].abs().max() > 1e-6


def test_glow_map_is_the_per_position_share_of_the_image_bits_per_dim():
    seed_all(0)
    model = Glow(in_channels=1, levels=2, steps=2, hidden_channels=8)
    images = torch.rand(4, 1, 16, 16)
    model.train().loss(as_batch(images))
    perturb(model)
    out = model.eval().predict(images)
    # The loss path (summed log-likelihoods) and the map path (per-position terms spread over pixels) agree.
    torch.testing.assert_close(out["anomaly_map"].mean((1, 2)), out["pred_score"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss = float(model.loss(as_batch(images))["loss"])
    torch.testing.assert_close(loss, float(out["pred_score"].mean()), rtol=1e-5, atol=1e-5)
    assert out["anomaly_map"].flatten(1).std(1).min() > 0  # the map varies over the image


@pytest.mark.parametrize("name", ["glow", "csflow"])
def test_scores_follow_their_images_through_a_shuffled_batch(name):
    """A score is its own image's: reordering the batch reorders the scores and maps (nothing mixes images at test
    time, e.g. an actnorm re-initialised on the test batch), and different images get different scores."""
    seed_all(0)
    kwargs = GLOW_SMALL if name == "glow" else dict(CSFLOW_SMALL, backbone="resnet18", pretrained=False)
    model = create_model(name, **kwargs)
    images = torch.rand(6, 1, 32, 32)
    images[3:] = images[3:].pow(3)  # darker, smoother images: not the training images' statistics
    model.train().loss(as_batch(images[:3]))
    perturb(model, 0.02)
    model.eval()
    out = model.predict(images)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = model.predict(images[order])
    torch.testing.assert_close(shuffled["pred_score"], out["pred_score"][order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled["anomaly_map"], out["anomaly_map"][order], rtol=1e-4, atol=1e-5)
    assert out["pred_score"].unique().numel() == 6


def check_outputs_and_rebuild(name: str, model, images: torch.Tensor, out: dict, tmp_path) -> None:
    """Shapes, finiteness, config() through the registry, and a save/load round trip through a file."""
    n, _, h, w = images.shape
    assert out["pred_score"].shape == (n,) and out["anomaly_map"].shape == (n, h, w)
    assert all(torch.isfinite(v).all() for v in out.values())
    config = model.config()
    rebuilt = create_model(name, **config)
    assert rebuilt.config() == config
    torch.save(model.state_dict(), tmp_path / "state.pt")
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = rebuilt.eval().predict(images[:4])
    torch.testing.assert_close(again["pred_score"], out["pred_score"][:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again["anomaly_map"], out["anomaly_map"][:4], rtol=1e-4, atol=1e-5)
    # The loaded actnorms are initialised: training the rebuilt model does not re-initialise them from a batch.
    before = {k: v.clone() for k, v in rebuilt.state_dict().items() if "log_scale" in k}
    with torch.no_grad():
        rebuilt.train().loss(as_batch(images[:4].flip(-1)))
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in before.items())


def separation(data: dict, out: dict) -> tuple[float, float]:
    lesion = data["label"] == 1
    image_auroc = auroc(data["label"], out["pred_score"])
    pixel_auroc = auroc(data["mask"][lesion].flatten(), out["anomaly_map"][lesion].flatten())
    return image_auroc, pixel_auroc


@slow
def test_glow_learns_normal_images_and_separates_synthetic_lesions(tmp_path):
    data = phantom_split(32)
    normal = data["test"][data["label"] == 0]
    seed_all(0)
    model = Glow(in_channels=1, **GLOW_SMALL)
    with torch.no_grad():
        model.train().loss(as_batch(data["train"][:16]))  # the actnorm initialisation training would do
        before = float(model.eval().predict(normal)["pred_score"].mean())
    train(model, data["train"], steps=300, lr=2e-3)
    out = model.predict(data["test"])
    check_outputs_and_rebuild("glow", model, data["test"], out, tmp_path)
    image_auroc, pixel_auroc = separation(data, out)
    after = float(out["pred_score"][data["label"] == 0].mean())
    print(f"glow: normal bits/dim {before:.3f} -> {after:.3f}; image AUROC {image_auroc:.3f}, "
          f"pixel AUROC {pixel_auroc:.3f}")
    assert after < before - 0.5, (before, after)
    assert image_auroc >= 0.7, image_auroc
    assert pixel_auroc >= 0.75, pixel_auroc


@slow
def test_csflow_separates_and_localises_synthetic_lesions(tmp_path):
    data = phantom_split(96)
    seed_all(0)
    model = train(create_model("csflow", **CSFLOW_SMALL), data["train"], steps=60, lr=2e-3)
    out = model.predict(data["test"])
    check_outputs_and_rebuild("csflow", model, data["test"], out, tmp_path)
    image_auroc, pixel_auroc = separation(data, out)
    print(f"csflow: image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f}")
    assert image_auroc >= 0.7, image_auroc
    assert pixel_auroc >= 0.75, pixel_auroc


@pytest.mark.parametrize("channels", [1, 3])
def test_csflow_takes_grayscale_colour_and_any_multiple_of_16(channels):
    model = create_model("csflow", backbone="resnet18", pretrained=False, coupling_blocks=1, hidden_channels=8)
    for size in (32, 48):
        images = torch.rand(2, channels, size, size)
        assert torch.isfinite(model.train().loss(as_batch(images))["loss"])
        out = model.eval().predict(images)
        assert out["pred_score"].shape == (2,) and out["anomaly_map"].shape == (2, size, size)


def test_glow_refuses_sizes_its_squeezes_cannot_halve_and_bad_options():
    model = Glow(levels=3, steps=1, hidden_channels=4).eval()
    assert model.predict(torch.rand(1, 1, 24, 24))["anomaly_map"].shape == (1, 24, 24)
    with pytest.raises(DataError, match="multiple of 8"):
        model.predict(torch.rand(1, 1, 20, 20))
    with pytest.raises(ConfigError, match="levels"):
        create_model("glow", levels=0)
    with pytest.raises(ConfigError, match="n_bits"):
        create_model("glow", n_bits=17)
    with pytest.raises(ConfigError, match="coupling_blocks"):
        create_model("csflow", backbone="resnet18", pretrained=False, coupling_blocks=0)
    with pytest.raises(ConfigError, match="kernel_size"):
        create_model("csflow", backbone="resnet18", pretrained=False, kernel_size=4)
