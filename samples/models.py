"""Hand-written torch model definitions for the Fashion-MNIST sample models.

Only used by ``samples/make_samples.py`` (torch is not a runtime dependency of onnxprune).

All models take raw pixels ``N x 1 x 28 x 28`` float32 in ``[0, 1]``. Zero-padding 28 -> 32 and
normalisation ``(x - mean) / std`` happen inside ``forward`` so they are part of the exported
ONNX graph (Pad, Sub, Div before the first Conv); callers never preprocess.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Fashion-MNIST training-set pixel statistics (on [0, 1] pixels, before padding).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


class InGraphPreprocess(nn.Module):
    """Pad 28x28 -> 32x32 with zeros, then ``(x - mean) / std``."""

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD, pad: int = 2):
        super().__init__()
        self.pad = pad
        self.register_buffer("mean", torch.tensor([[[[mean]]]], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([[[[std]]]], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """ResNet basic block; option-B (1x1 conv + BN) projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class StagedResNet(nn.Module):
    """Basic-block ResNet: stem conv, ``len(widths)`` stages of ``blocks`` blocks, GAP, fc.

    Every stage but the first halves the resolution in its first block; ``stride_first_stage``
    does so for the first stage too (the wide model, to stay trainable on 2 CPU cores).
    """

    def __init__(self, blocks: int, widths, num_classes: int = 10, stride_first_stage: bool = False):
        super().__init__()
        self.pre = InGraphPreprocess()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_planes = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stride = 2 if b == 0 and (i > 0 or stride_first_stage) else 1
                layers.append(BasicBlock(in_planes, w, stride))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def CifarResNet(n: int, num_classes: int = 10, widths=(16, 32, 64)) -> StagedResNet:
    """He et al. (2016) CIFAR ResNet-(6n+2): 16/32/64 channels, 3 stages x n basic blocks."""
    return StagedResNet(n, widths, num_classes)


def WideResNet18s(blocks: int = 1, num_classes: int = 10, widths=(64, 128, 256, 512)) -> StagedResNet:
    """ResNet-18-style basic blocks at 64/128/256/512 channels, ``blocks`` per stage.

    Stem: 3x3 conv (64 ch) at 32x32; stage 1 has stride 2 (16x16), then 8x8, 4x4, 2x2.
    Striding stage 1 keeps it trainable on 2 CPU cores while keeping the wide 3x3 convs
    (the interesting pruning targets).
    """
    return StagedResNet(blocks, widths, num_classes, stride_first_stage=True)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # zero-init the last BN of each residual branch: faster, more stable early training
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def build(name: str) -> nn.Module:
    if name == "resnet20":
        return CifarResNet(3)
    if name == "resnet56":
        return CifarResNet(9)
    if name == "wide_resnet":
        return WideResNet18s(1)
    raise ValueError(f"unknown model {name!r}")


MODEL_NAMES = ("resnet20", "resnet56", "wide_resnet")
