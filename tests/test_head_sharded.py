"""The sharded head on 1-4 gloo ranks equals a plain single-process loss over the full weight.

Tolerances (fp32): rtol=1e-4, atol=1e-6 for the loss, the gradients and the boundary. The
sharded run sums the negatives' exponentials per rank and then across ranks, and the reference
takes one log-sum-exp over the full row, so the two agree to rounding, not bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gbcosface.head import ShardedHead, class_range
from gbcosface.losses import ArcFace, CosFace, GBCosFace
from tests import reference
from tests.dist_utils import run_ranks

TOL = dict(rtol=1e-4, atol=1e-6)
NUM_CLASSES, DIM, LOCAL_BATCH = 11, 8, 5


def make_step_data(step: int, world: int, weight_full: torch.Tensor, aligned: bool):
    """The global batch of one step, identical on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    n = LOCAL_BATCH * world
    labels = torch.randint(0, weight_full.shape[0], (n,), generator=gen)
    x = torch.randn(n, weight_full.shape[1], generator=gen)
    if aligned:  # embeddings near their class rows: large p_y and p_v
        x = weight_full[labels] * 3.0 + 0.3 * x
    return x, labels


def full_weight(num_classes: int = NUM_CLASSES, dim: int = DIM) -> torch.Tensor:
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(7))


def check_against_reference(ctx, kind: str, gb_range: tuple[float, float]) -> None:
    torch.manual_seed(0)
    world, rank = ctx.world_size, ctx.rank
    w_full = full_weight()
    if kind == "gbcosface":
        margin = GBCosFace(s=32.0, m=0.16, alpha=0.15, update_rate=0.3, boundary_min=gb_range[0], boundary_max=gb_range[1])
    elif kind == "cosface":
        margin = CosFace(s=64.0, m=0.4)
    else:
        margin = ArcFace(s=64.0, m=0.5)
    head = ShardedHead(margin, DIM, NUM_CLASSES, group=ctx.group)
    start, count = class_range(NUM_CLASSES, world, rank)
    assert (head.class_start, head.num_local) == (start, count)
    with torch.no_grad():
        head.weight.copy_(w_full[start : start + count])

    state = float("nan")
    for step in range(4):
        x_global, labels = make_step_data(step, world, w_full, aligned=step >= 2)
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        x_local = x_global[sl].clone().requires_grad_(True)
        head.weight.grad = None
        loss = head(x_local, labels[sl])
        loss.backward()

        x_ref = x_global.clone().requires_grad_(True)
        w_ref = w_full.clone().requires_grad_(True)
        if kind == "gbcosface":
            ref, state = reference.gbcosface_loss(x_ref, w_ref, labels, 32.0, 0.16, 0.15, state, 0.3, *gb_range)
        elif kind == "cosface":
            ref = reference.cosface_loss(x_ref, w_ref, labels, 64.0, 0.4)
        else:
            ref = reference.arcface_loss(x_ref, w_ref, labels, 64.0, 0.5)
        ref.backward()

        assert_close(loss.detach(), ref.detach(), **TOL)
        assert_close(x_local.grad, x_ref.grad[sl], **TOL)
        assert_close(head.weight.grad, w_ref.grad[start : start + count], **TOL)
        if kind == "gbcosface":
            assert_close(margin.boundary, torch.tensor([state], dtype=torch.float32), **TOL)


def check_all_losses(ctx) -> None:
    for kind in ("gbcosface", "cosface", "arcface"):
        check_against_reference(ctx, kind, (0.5, 0.7))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_equals_single_process(world, tmp_path):
    """GBCosFace, CosFace and ArcFace, 4 steps each (boundary init, EMA), on uneven shards."""
    run_ranks(check_all_losses, world, tmp_path)


@pytest.mark.parametrize("gb_range", [(-1.0, -0.95), (0.95, 1.0), (-1.0, 1.0)], ids=["clamp-high", "clamp-low", "no-clamp"])
def test_boundary_clamps_both_ends(gb_range, tmp_path):
    """The clamp binds from above, from below, and not at all (pure EMA), on 3 uneven shards."""
    w_full = full_weight()
    # The scenario is real: the batch means of p_v lie outside the clamp range (or inside it).
    state, means = float("nan"), []
    for step in range(4):
        x, labels = make_step_data(step, 3, w_full, aligned=step >= 2)
        cos = reference.cosines(x, w_full)
        p_y = cos.gather(1, labels[:, None]).squeeze(1)
        neg = cos.masked_fill(torch.nn.functional.one_hot(labels, NUM_CLASSES).bool(), float("-inf"))
        means.append(((p_y + torch.logsumexp(32 * neg, 1) / 32) / 2).mean().item())
    if gb_range == (-1.0, -0.95):
        assert min(means) > -0.95
    elif gb_range == (0.95, 1.0):
        assert max(means) < 0.95
    else:
        assert all(-1 < v < 1 for v in means)
    run_ranks(check_against_reference, 3, tmp_path, "gbcosface", gb_range)


def test_gbcosface_alpha0_equals_cosface_2m():
    torch.manual_seed(3)
    w_full = full_weight(23, 16)
    x = torch.randn(12, 16)
    labels = torch.randint(0, 23, (12,))
    results = []
    for margin in (GBCosFace(s=32.0, m=0.16, alpha=0.0, update_rate=0.5), CosFace(s=32.0, m=0.32)):
        head = ShardedHead(margin, 16, 23)
        with torch.no_grad():
            head.weight.copy_(w_full)
        xi = x.clone().requires_grad_(True)
        for _ in range(2):  # the second step runs with a boundary state set by the first
            xi.grad, head.weight.grad = None, None
            loss = head(xi, labels)
            loss.backward()
        results.append((loss.detach(), xi.grad.clone(), head.weight.grad.clone()))
    (l1, gx1, gw1), (l2, gx2, gw2) = results
    assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert_close(gx1, gx2, rtol=1e-5, atol=1e-7)
    assert_close(gw1, gw2, rtol=1e-5, atol=1e-7)


def test_boundary_is_a_buffer_in_state_dict():
    loss = GBCosFace()
    assert "boundary" in dict(loss.named_buffers())
    assert math.isnan(loss.state_dict()["boundary"].item())
    head = ShardedHead(loss, 4, 6)
    head(torch.randn(3, 4), torch.tensor([0, 1, 5]))
    restored = GBCosFace()
    restored.load_state_dict(loss.state_dict())
    assert_close(restored.boundary, loss.boundary)
    assert not math.isnan(restored.boundary.item())


def test_eval_mode_leaves_boundary_alone():
    loss = GBCosFace()
    head = ShardedHead(loss, 4, 6).eval()
    out = head(torch.randn(3, 4), torch.tensor([0, 1, 5]))
    assert torch.isfinite(out)
    assert math.isnan(loss.boundary.item())
