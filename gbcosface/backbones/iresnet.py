"""Improved ResNets (iresnet18/50/100) for 112x112 faces, as trained by InsightFace.

The module and parameter names follow InsightFace's arcface_torch (``conv1``, ``bn1``,
``prelu``, ``layer1.0.bn1`` ... ``layer4.N.bn3``, ``layerK.0.downsample.{0,1}``, ``bn2``,
``fc``, ``features``) so its published state dicts load by name with ``strict=True``.
Mixed precision is left to the trainer's autocast.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-5
_STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, + skip.

    The stride sits on the second convolution; a 1x1 strided conv + BN projects the skip path
    when the shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


class IResNet(nn.Module):
    """Stem (conv3x3 64, BN, PReLU), four stride-2 stages, then BN, dropout, FC, BN1d.

    A 112x112 input leaves the last stage as 512x7x7, flattened into the FC layer. The final
    BatchNorm1d has a frozen unit scale (as in arcface_torch) so it only centres and shifts.
    """

    def __init__(self, layers: tuple[int, ...], embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"iresnet: input_size must be a multiple of 16, got {input_size}")
        self.embedding_size = embedding_size
        self.conv1 = _conv3x3(3, _STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0], eps=_EPS)
        self.prelu = nn.PReLU(_STAGE_WIDTHS[0])
        cin = _STAGE_WIDTHS[0]
        for i, (width, depth) in enumerate(zip(_STAGE_WIDTHS, layers), start=1):
            blocks = [IBasicBlock(cin, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        spatial = input_size // 16
        self.bn2 = nn.BatchNorm2d(cin, eps=_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet18(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet(DEPTHS["iresnet18"], embedding_size, **kw)


def iresnet50(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet(DEPTHS["iresnet50"], embedding_size, **kw)


def iresnet100(embedding_size: int = 512, **kw) -> IResNet:
    return IResNet(DEPTHS["iresnet100"], embedding_size, **kw)
