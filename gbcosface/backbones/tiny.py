"""A tiny CNN for CPU demos and tests: four stride-2 conv/BN/PReLU layers, FC, BatchNorm1d.

About 10 MMACs per 112x112 image, so a CPU core embeds hundreds of images a second while the
network still learns identities from the synthetic demo set.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, embedding_size: int = 128, width: int = 16, input_size: int = 112) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"tiny: input_size must be a multiple of 16, got {input_size}")
        self.embedding_size = embedding_size
        widths = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]
        self.body = nn.Sequential(*layers)
        spatial = input_size // 16
        self.fc = nn.Linear(widths[-1] * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.body(x), 1)))
