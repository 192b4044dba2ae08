"""Plain single-process margin losses over the FULL weight, written from the papers' formulas.

They share no code with gbcosface.head / gbcosface.losses: cross-entropy over the whole
``[N, C]`` logit matrix with the margin applied to the target logit, and autograd for every
gradient. The sharded implementation is compared against these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosines(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()).clamp(-1.0, 1.0)


def cosface_loss(x, weight, labels, s, m):
    cos = cosines(x, weight)
    onehot = F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    return F.cross_entropy(s * (cos - m * onehot), labels)


def arcface_loss(x, weight, labels, s, m):
    cos = cosines(x, weight)
    target = cos.gather(1, labels[:, None]).squeeze(1)
    # cos(theta + m) while theta + m <= pi, then the linear continuation used by InsightFace.
    theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
    phi = torch.where(target > math.cos(math.pi - m), torch.cos(theta + m), target - math.sin(math.pi - m) * m)
    logits = s * cos.scatter(1, labels[:, None], phi[:, None])
    return F.cross_entropy(logits, labels)


def gbcosface_loss(x, weight, labels, s, m, alpha, state, r, gmin, gmax):
    """Returns (loss, new_state); ``state`` is a float (NaN before the first step)."""
    cos = cosines(x, weight)
    p_y = cos.gather(1, labels[:, None]).squeeze(1)
    neg = cos.masked_fill(F.one_hot(labels, weight.shape[0]).bool(), float("-inf"))
    p_n = torch.logsumexp(s * neg, dim=1) / s
    p_v = ((p_y + p_n) / 2).detach()
    mean_pv = p_v.mean().item()
    if math.isnan(state):
        state = mean_pv
    g = min(max(state, gmin), gmax)
    pv_used = (1 - alpha) * p_v + alpha * g
    pos = F.softplus(2 * s * (pv_used - p_y + m))
    negt = F.softplus(2 * s * (p_n - pv_used + m))
    loss = pos.mean() / 2 + negt.mean() / 2
    return loss, (1 - r) * g + r * mean_pv
