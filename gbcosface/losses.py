"""Margin losses written on two per-sample scalars.

Every loss here depends on the cosines of sample i only through

* ``p_y = cos(x_i, w_{y_i})`` (the positive similarity) and
* ``p_n = (1/s) * logsumexp_{j != y_i}(s * cos(x_i, w_j))`` (a smooth max of the negatives),

so the sharded head (:mod:`gbcosface.head`) can assemble both with O(N) collectives and ask the
loss for ``dL/dp_y`` and ``dL/dp_n`` by autograd on ``[N]`` vectors; it never needs an autograd
graph over the ``[N, C_local]`` block. Inputs are fp32 ``[N]`` tensors over the GLOBAL batch and
identical on every rank; each loss returns per-sample values whose mean is the training loss.

* CosFace:   ``softplus(s * (p_n - (p_y - m)))``  = cross-entropy with an additive cosine margin.
* ArcFace:   ``softplus(s * (p_n - phi(p_y)))`` with ``phi(c) = cos(arccos(c) + m)`` (and the usual
  linear continuation ``c - m sin(m)`` past ``arccos(c) + m > pi``, which keeps it monotonic).
* GB-CosFace: see ``docs/GB-COSFACE.md``; the global boundary is a buffer ``boundary``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from gbcosface.collectives import all_reduce_mean_


class MarginOutput(NamedTuple):
    """Per-sample losses ``[N]`` (with autograd to p_y, p_n) and detached terms for logging."""

    per_sample: torch.Tensor
    terms: dict[str, torch.Tensor]


class MarginLoss(nn.Module):
    """Base: ``s`` is the scale the head uses for the negatives' log-sum-exp."""

    s: float

    def forward(self, p_y: torch.Tensor, p_n: torch.Tensor, group: ProcessGroup | None = None) -> MarginOutput:
        raise NotImplementedError


class CosFace(MarginLoss):
    """Large margin cosine loss (Wang et al., CVPR 2018)."""

    def __init__(self, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"CosFace: scale s must be > 0, got {s}")
        self.s, self.m = float(s), float(m)

    def forward(self, p_y: torch.Tensor, p_n: torch.Tensor, group: ProcessGroup | None = None) -> MarginOutput:
        per = F.softplus(self.s * (p_n - p_y + self.m))
        return MarginOutput(per, {})

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFace(MarginLoss):
    """Additive angular margin loss (Deng et al., CVPR 2019)."""

    # Keeps d phi / d c finite at cos = +-1 (sqrt(1 - c^2) has an infinite slope at 0).
    _EPS = 1e-12

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"ArcFace: scale s must be > 0, got {s}")
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace: margin m must be in [0, pi/2), got {m}")
        self.s, self.m = float(s), float(m)
        self._cos_m, self._sin_m = math.cos(m), math.sin(m)
        self._threshold = math.cos(math.pi - m)
        self._linear_drop = math.sin(math.pi - m) * m

    def phi(self, c: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt(torch.clamp(1.0 - c * c, min=self._EPS))
        angular = c * self._cos_m - sin * self._sin_m
        return torch.where(c > self._threshold, angular, c - self._linear_drop)

    def forward(self, p_y: torch.Tensor, p_n: torch.Tensor, group: ProcessGroup | None = None) -> MarginOutput:
        per = F.softplus(self.s * (p_n - self.phi(p_y)))
        return MarginOutput(per, {})

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class GBCosFace(MarginLoss):
    """GB-CosFace (Chen et al., ACCV 2022): CosFace with an adaptive global boundary.

    The boundary state ``boundary`` (1 element, NaN until the first training step) follows
    docs/GB-COSFACE.md. On a training step, in this order:

    1. first step ever: ``boundary = mean(p_v)`` over the global batch;
    2. the loss uses ``G = clamp(boundary, boundary_min, boundary_max)``;
    3. ``boundary <- (1 - r) * G + r * mean(p_v)``, then averaged over the group (all ranks hold
       identical inputs, so this is also a consistency guard).

    In eval mode the state is read, never written (NaN state reads as this batch's mean p_v).
    All of it stays on the device: no host synchronisation.
    """

    def __init__(
        self,
        s: float = 32.0,
        m: float = 0.16,
        alpha: float = 0.15,
        update_rate: float = 0.01,
        boundary_min: float = 0.5,
        boundary_max: float = 0.7,
    ) -> None:
        super().__init__()
        problems = []
        if s <= 0:
            problems.append(f"scale s must be > 0, got {s}")
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= update_rate <= 1.0:
            problems.append(f"update_rate must be in [0, 1], got {update_rate}")
        if boundary_min > boundary_max:
            problems.append(f"boundary_min ({boundary_min}) must be <= boundary_max ({boundary_max})")
        if problems:
            raise ValueError("GBCosFace: " + "; ".join(problems))
        self.s, self.m, self.alpha = float(s), float(m), float(alpha)
        self.update_rate = float(update_rate)
        self.boundary_min, self.boundary_max = float(boundary_min), float(boundary_max)
        self.register_buffer("boundary", torch.full((1,), float("nan"), dtype=torch.float32))

    def forward(self, p_y: torch.Tensor, p_n: torch.Tensor, group: ProcessGroup | None = None) -> MarginOutput:
        p_v = (0.5 * (p_y + p_n)).detach()
        mean_pv = p_v.mean().reshape(1).to(self.boundary.dtype)
        state = torch.where(torch.isnan(self.boundary), mean_pv, self.boundary)
        g = state.clamp(self.boundary_min, self.boundary_max)
        p_v_used = (1.0 - self.alpha) * p_v + self.alpha * g.to(p_v.dtype)
        two_s = 2.0 * self.s
        pos = F.softplus(two_s * (p_v_used - p_y + self.m))
        neg = F.softplus(two_s * (p_n - p_v_used + self.m))
        if self.training:
            with torch.no_grad():
                new_state = (1.0 - self.update_rate) * g + self.update_rate * mean_pv
                self.boundary.copy_(all_reduce_mean_(new_state, group))
        terms = {
            "loss_pos": pos.detach().mean() / 2,
            "loss_neg": neg.detach().mean() / 2,
            "boundary_used": g.detach()[0],
        }
        return MarginOutput(0.5 * (pos + neg), terms)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m={self.m}, alpha={self.alpha}, update_rate={self.update_rate}, "
            f"boundary=[{self.boundary_min}, {self.boundary_max}]"
        )


def build_margin_loss(name: str, **kwargs: float) -> MarginLoss:
    """``"gbcosface" | "cosface" | "arcface"`` with the section's keyword arguments."""
    losses = {"gbcosface": GBCosFace, "cosface": CosFace, "arcface": ArcFace}
    try:
        cls = losses[name.lower()]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(losses)}") from None
    return cls(**kwargs)
