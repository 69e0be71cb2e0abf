"""GANomaly: shapes, config round trip, the separation of the two players' gradients, and training on phantoms."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from test_baselines import as_batch, auroc, phantom_split, train

from aeflow.errors import ConfigError, DataError
from aeflow.models import create_model
from aeflow.models.base import saved_model_options
from aeflow.models.ganomaly import GANomaly

TINY = dict(widths=(8, 16), latent_channels=4)



@pytest.mark.parametrize("blocks", ["dcgan", "conv"])
@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_have_the_input_size_and_are_finite(channels, blocks):
    torch.manual_seed(0)
    model = GANomaly(in_channels=channels, blocks=blocks, **TINY)
    for size in (32, 48):
        images = torch.rand(3, channels, size, size)
        losses = model.train().loss(as_batch(images))
        assert all(torch.isfinite(v) for v in losses.values()), losses
        out = model.eval().predict(images)
        assert out["anomaly_map"].shape == (3, size, size)
        for key in ("pred_score", "score_latent", "score_residual"):
            assert out[key].shape == (3,) and torch.isfinite(out[key]).all(), key
        torch.testing.assert_close(out["pred_score"], out["score_latent"])
    with pytest.raises(DataError, match="multiple of 4"):
        model.predict(torch.rand(1, channels, 30, 30))


def test_config_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = train(GANomaly(**TINY), torch.rand(8, 1, 32, 32), steps=3, lr=1e-3)
    rebuilt = create_model("ganomaly", **model.config())
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(4, 1, 32, 32)
    expected, got = model.eval().predict(images), rebuilt.eval().predict(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_the_default_networks_are_the_papers_dcgan_stacks():
    """G_E / E / D: 4 x 4 stride-2 convolutions only (no 3 x 3 refinement), batch norm on all but the first; G_D:
    4 x 4 stride-2 transposed convolutions after the 3 x 3 convolution from the spatial latent."""
    model = GANomaly(widths=(8, 16, 32), latent_channels=4)
    for stack in (model.encoder[0], model.reencoder[0], model.discriminator.features):
        convs = [m for m in stack.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * 3
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stack.modules()) == 2
    transposed = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in transposed] == [((4, 4), (2, 2), 16),
                                                                                 ((4, 4), (2, 2), 8),
                                                                                 ((4, 4), (2, 2), 1)]
    # The refinement convolutions are most of the older networks' work: measured 0.002 against 0.009 GFLOP here,
    # 0.16 against 0.72 for the default widths at 64 px.
    flops = {}
    for blocks in ("dcgan", "conv"):
        with FlopCounterMode(display=False) as counter:
            GANomaly(widths=(8, 16, 32), latent_channels=4, blocks=blocks).eval().predict(torch.rand(1, 1, 32, 32))
        flops[blocks] = counter.get_total_flops()
    assert flops["dcgan"] < flops["conv"] / 3, flops


def test_a_run_saved_before_the_dcgan_networks_rebuilds_with_its_own():
    """A config saved before `blocks` existed has no such key: it must rebuild the networks those runs had
    ("conv"), whose weights then load strictly; a new model without the option gets the paper's."""
    torch.manual_seed(0)
    old = GANomaly(blocks="conv", **TINY)
    saved = {k: v for k, v in old.config().items() if k != "blocks"}
    options = saved_model_options("ganomaly", saved)
    assert options["blocks"] == "conv"
    rebuilt = create_model("ganomaly", **options)
    rebuilt.load_state_dict(old.state_dict(), strict=True)
    images = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(rebuilt.eval().predict(images)["pred_score"], old.eval().predict(images)["pred_score"])
    assert create_model("ganomaly", **saved).config()["blocks"] == "dcgan"
    with pytest.raises(RuntimeError):
        create_model("ganomaly", **saved).load_state_dict(old.state_dict(), strict=True)


def test_each_player_loss_reaches_only_its_own_parameters():
    """loss_D must not move the generator, and loss_G (its adversarial term included) must not move D; the
    adversarial term must still reach the generator through D, or feature matching would do nothing."""
    torch.manual_seed(0)
    model = GANomaly(**TINY).train()
    generator = [p for name, p in model.named_parameters() if not name.startswith("discriminator.")]
    discriminator = list(model.discriminator.parameters())
    losses = model.loss(as_batch(torch.rand(4, 1, 32, 32)))

    def grads(loss, params):
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    assert all(g is None for g in grads(losses["loss_d"], generator))
    assert all(g is None for g in grads(losses["loss_g"], discriminator))
    assert all(g is None for g in grads(losses["adversarial"], discriminator))
    decoder_grads = grads(losses["adversarial"], list(model.decoder.parameters()))
    assert sum(g.abs().sum() for g in decoder_grads if g is not None) > 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads(losses["loss_d"], discriminator))


def test_invalid_options_are_refused():
    with pytest.raises(ConfigError, match="in_channels"):
        GANomaly(in_channels=2)
    with pytest.raises(ConfigError, match="weights"):
        GANomaly(w_con=-1)
    with pytest.raises(ConfigError, match="blocks"):
        GANomaly(blocks="resnet")


def test_trains_on_synthetic_phantoms_and_localises_lesions():
    """Honest scope: GANomaly's own image score |z - z'|^2 does not reliably clear the 0.7 image bound of
    test_baselines within a test budget (~60 s on one thread), so no image bound is asserted. Measured (seeds 0 / 1 /
    2 of torch; GANomaly draws nothing from numpy):
    - this configuration (64 training images, 200 Adam steps at lr 2e-3, ~12 s): 0.51 / 0.62 / 0.50 on the 20 vs 20
      test images; 0.67 / 0.52 / 0.58 after 400 steps. Normal test images score as high as lesion ones because the
      generator overfits the 64 training images (their latent score is ~25% lower than held-out normals').
    - 512 training images, latent 4, 16 or 64 channels, lr 1e-3 or 2e-3, 600-900 steps (30-55 s), seeds 0 and 1, on a
      separate draw of 100 vs 100: 0.71-0.77; 1024 training images, 800-1200 steps: 0.67-0.76; lr 5e-3: 0.55-0.64;
      a paper-like 1 x 1 x 100 latent: 0.28-0.47. The score's true AUROC plateaus at ~0.75, so on 20 vs 20 (null sd
      0.092) or even 50 vs 50 (0.058) test images a seed falls below 0.7 too often to assert it.
    What the generator does learn is to reconstruct normal anatomy: its residual map localises the lesions (pixel AUROC
    0.96-0.98 measured), which is held to the same 0.75 pixel bound as the other baselines (about 16k pixels, so
    chance-level pixel AUROC has a tiny spread).
    The measurements above are of the networks GANomaly had before (`blocks="conv"`). With the paper's DCGAN
    networks (the default since), this configuration: image 0.77 / 0.63 / 0.51, pixel 0.94 / 0.95 / 0.94."""
    data = phantom_split(32)
    torch.manual_seed(0)
    model = train(GANomaly(widths=(16, 32, 64), latent_channels=4, blur_sigma=1.0), data["train"], steps=200, lr=2e-3)
    out = model.predict(data["test"])
    lesion = data["label"] == 1
    pixel_auroc = auroc(data["mask"][lesion].flatten(), out["anomaly_map"][lesion].flatten())
    image_auroc = auroc(data["label"], out["pred_score"])
    print(f"ganomaly: image AUROC (latent) {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f}")
    assert pixel_auroc >= 0.75, f"ganomaly pixel AUROC {pixel_auroc:.3f}"
