"""MobileFaceNet (Chen et al. 2018) in the widened form InsightFace trains as ``mbf``.

112x112 -> stride-2 stem -> three stride-2 depthwise stages (to 7x7) -> 1x1 conv to 512 ->
global depthwise conv (GDC, 7x7) -> linear -> BatchNorm1d. ``blocks`` sets the residual
blocks per stage and ``scale`` the stage widths (64*scale, 128*scale): the defaults
``(1, 4, 6, 2)``, ``scale=2`` are InsightFace's ``mbf``; ``(2, 8, 12, 4)``, ``scale=4`` its
``mbf_large``.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Conv, BN and PReLU (``linear=True`` drops the PReLU, for projections)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, linear: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden``, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        if residual and (cin != cout or stride != 1):
            raise ValueError("a residual DepthWise block needs cin == cout and stride 1")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, hidden),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            ConvBlock(hidden, cout, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def _residual_stage(channels: int, hidden: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWise(channels, channels, hidden, residual=True) for _ in range(num_blocks)])


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 scale: int = 2, input_size: int = 112) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"mobilefacenet: blocks must be 4 positive counts, got {blocks}")
        if input_size % 16:
            raise ValueError(f"mobilefacenet: input_size must be a multiple of 16, got {input_size}")
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            first: nn.Module = ConvBlock(c1, c1, 3, 1, 1, groups=c1)
        else:
            first = _residual_stage(c1, 128, blocks[0])
        self.layers = nn.Sequential(
            ConvBlock(3, c1, 3, 2, 1),
            first,
            DepthWise(c1, c1, 128, stride=2),
            _residual_stage(c1, 128, blocks[1]),
            DepthWise(c1, c2, 256, stride=2),
            _residual_stage(c2, 256, blocks[2]),
            DepthWise(c2, c2, 512, stride=2),
            _residual_stage(c2, 256, blocks[3]),
        )
        self.conv_sep = ConvBlock(c2, 512)
        spatial = input_size // 16
        self.gdc = ConvBlock(512, 512, spatial, groups=512, linear=True)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(self.conv_sep(self.layers(x)))
        return self.features(self.fc(torch.flatten(x, 1)))
