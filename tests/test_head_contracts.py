"""The DDP gradient contract, Partial FC sampling, extreme inputs and the user errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

from gbcosface.head import ShardedHead, class_range, init_rows
from gbcosface.losses import ArcFace, CosFace, GBCosFace
from tests import reference
from tests.dist_utils import run_ranks

# ---------------------------------------------------------------- DDP contract


def small_backbone() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))


def ddp_step(ctx, result_dir: str) -> None:
    """Under DDP the head scales the embedding gradient by W so one SGD step matches one process."""
    world, rank, classes, b = ctx.world_size, ctx.rank, 9, 4
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(world * b, 6, generator=gen)
    labels = torch.randint(0, classes, (world * b,), generator=gen)

    def make_head(group, scale):
        return ShardedHead(GBCosFace(update_rate=0.2), 8, classes, group=group, seed=3, embedding_grad_scale=scale)

    # Reference: one process, the whole batch, the whole head.
    ref_net, ref_head = small_backbone(), make_head(None, 1.0)
    ref_opt = torch.optim.SGD(list(ref_net.parameters()) + list(ref_head.parameters()), lr=0.5, momentum=0.9)
    for _ in range(2):
        ref_opt.zero_grad()
        ref_head(ref_net(images), labels).backward()
        ref_opt.step()

    net = DDP(small_backbone())
    head = make_head(ctx.group, float(world))
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.5, momentum=0.9)
    sl = slice(rank * b, (rank + 1) * b)
    for _ in range(2):
        opt.zero_grad()
        head(net(images[sl]), labels[sl]).backward()
        opt.step()

    for (name, p), p_ref in zip(net.module.named_parameters(), ref_net.parameters()):
        assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"backbone {name}: {m}")
    start, count = class_range(classes, world, rank)
    assert_close(head.weight, ref_head.weight[start : start + count], rtol=1e-5, atol=1e-6)
    assert_close(head.margin_loss.boundary, ref_head.margin_loss.boundary, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_step_matches_single_process(world, tmp_path):
    run_ranks(ddp_step, world, tmp_path, str(tmp_path))


# ---------------------------------------------------------------- Partial FC


def test_sampling_keeps_every_positive_and_is_reproducible():
    labels = torch.tensor([3, 3, 17, 40, 41, 99, 120, 7])
    head = ShardedHead(CosFace(), 4, 200, sample_rate=0.1, seed=1)
    twin = ShardedHead(CosFace(), 4, 200, sample_rate=0.1, seed=1)
    other = ShardedHead(CosFace(), 4, 200, sample_rate=0.1, seed=2)
    draws, other_draws = [], []
    for _ in range(3):
        index, col = head.sample(labels)
        twin_index, twin_col = twin.sample(labels)
        assert torch.equal(index, twin_index) and torch.equal(col, twin_col)
        assert len(index) == 20 and torch.equal(index, index.unique())  # ceil(0.1 * 200)
        assert set(labels.tolist()) <= set(index.tolist())
        assert torch.equal(index[col], labels)  # the column points at the label's row
        draws.append(index)
        other_draws.append(other.sample(labels)[0])
    assert not all(torch.equal(a, b) for a, b in zip(draws, draws[1:]))  # fresh draw per step
    assert not all(torch.equal(a, b) for a, b in zip(draws, other_draws))  # seed matters


def test_sampling_state_round_trips():
    labels = torch.tensor([1, 2, 3])
    head = ShardedHead(CosFace(), 4, 100, sample_rate=0.2, seed=4)
    head.sample(labels)
    saved = copy.deepcopy(head.state_dict())
    expect = head.sample(labels)[0]
    fresh = ShardedHead(CosFace(), 4, 100, sample_rate=0.2, seed=99)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.sample(labels)[0], expect)


def test_more_positives_than_samples_keeps_them_all():
    labels = torch.arange(0, 30)
    head = ShardedHead(CosFace(), 4, 40, sample_rate=0.25)
    index, col = head.sample(labels)
    assert len(index) == 30 and torch.equal(index[col], labels)


def sampled_vs_restricted_reference(ctx, rate: float) -> None:
    """The sampled loss equals a full softmax over exactly the kept classes of all ranks."""
    world, rank, classes, dim, b = ctx.world_size, ctx.rank, 37, 8, 6
    w_full = torch.randn(classes, dim, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(world * b, dim, generator=gen)
    labels = torch.randint(0, classes, (world * b,), generator=gen)
    head = ShardedHead(CosFace(s=30.0, m=0.3), dim, classes, sample_rate=rate, group=ctx.group, seed=5)
    start, count = class_range(classes, world, rank)
    with torch.no_grad():
        head.weight.copy_(w_full[start : start + count])
    # Draw the same sample the forward will draw, to learn which global classes are kept.
    state = head._sampler.get_state()
    kept_local = head.sample(labels)[0] + start
    head._sampler.set_state(state)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, kept_local.tolist(), group=ctx.group)
    kept = torch.tensor(sorted(c for p in parts for c in p))

    sl = slice(rank * b, (rank + 1) * b)
    x_local = x[sl].clone().requires_grad_(True)
    loss = head(x_local, labels[sl])
    loss.backward()

    remap = torch.full((classes,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    x_ref, w_ref = x.clone().requires_grad_(True), w_full.clone().requires_grad_(True)
    ref = reference.cosface_loss(x_ref, w_ref[kept], remap[labels], 30.0, 0.3)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-6)
    assert_close(x_local.grad, x_ref.grad[sl], rtol=1e-4, atol=1e-6)
    assert_close(head.weight.grad, w_ref.grad[start : start + count], rtol=1e-4, atol=1e-6)
    if rate == 1.0:
        assert len(kept) == classes


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_sampled_loss_on_two_ranks(rate, tmp_path):
    run_ranks(sampled_vs_restricted_reference, 2, tmp_path, rate)


def test_sample_rate_one_equals_unsampled():
    torch.manual_seed(0)
    x, labels = torch.randn(10, 8), torch.randint(0, 15, (10,))
    losses = []
    for rate in (1.0, 0.99):  # 0.99 takes the sampling path, and ceil(0.99 * 15) keeps every row
        head = ShardedHead(GBCosFace(), 8, 15, sample_rate=rate, seed=1)
        before = head._sampler.get_state()
        xi = x.clone().requires_grad_(True)
        loss = head(xi, labels)
        loss.backward()
        losses.append((loss.detach(), xi.grad, head.weight.grad))
        assert torch.equal(head._sampler.get_state(), before) == (rate == 1.0)
    assert ShardedHead(GBCosFace(), 8, 15, sample_rate=0.99).num_sample == 15
    for a, b in zip(*losses):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- initialisation


def test_initial_rows_do_not_depend_on_world_size():
    classes, dim = 10_000, 4
    full = init_rows(0, classes, dim, seed=7)
    for world in (2, 3, 8):
        parts = [init_rows(*class_range(classes, world, r), dim, seed=7) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_rows(0, classes, dim, seed=8), full)
    assert abs(full.std().item() - 0.01) < 1e-3


# ---------------------------------------------------------------- extreme inputs


@pytest.mark.parametrize("margin", [GBCosFace(), CosFace(), ArcFace()], ids=["gb", "cos", "arc"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_all_cosines_at_plus_minus_one_are_finite(margin, sign):
    head = ShardedHead(margin, 4, 5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(5, 4))
    x = (sign * torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 3)).requires_grad_(True)
    loss = head(x, torch.tensor([0, 2, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def extreme_shapes(ctx) -> None:
    """One class per rank and a batch of one sample per rank."""
    for margin in (GBCosFace(), CosFace(), ArcFace()):
        head = ShardedHead(margin, 3, ctx.world_size, group=ctx.group)
        assert head.num_local == 1
        x = torch.randn(1, 3, generator=torch.Generator().manual_seed(ctx.rank)).requires_grad_(True)
        loss = head(x, torch.tensor([ctx.rank]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_one_class_per_rank_and_batch_of_one(tmp_path):
    run_ranks(extreme_shapes, 2, tmp_path)


def test_batch_of_one_single_process():
    head = ShardedHead(GBCosFace(), 3, 4)
    x = torch.randn(1, 3, requires_grad=True)
    loss = head(x, torch.tensor([2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bf16_embeddings_give_fp32_statistics():
    torch.manual_seed(1)
    w_full = torch.randn(20, 16)
    x, labels = torch.randn(8, 16), torch.randint(0, 20, (8,))
    head = ShardedHead(CosFace(s=64.0, m=0.4), 16, 20)
    with torch.no_grad():
        head.weight.copy_(w_full)
    xb = x.bfloat16().requires_grad_(True)
    loss = head(xb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    ref = reference.cosface_loss(x.bfloat16().float(), w_full, labels, 64.0, 0.4)
    # bf16 cosines carry ~3 significant digits; the loss is s * cos-scale, so a loose bound.
    assert_close(loss, ref, rtol=2e-2, atol=0.3)


# ---------------------------------------------------------------- user errors


def test_fewer_classes_than_ranks_message(tmp_path):
    run_ranks(_too_few_classes, 3, tmp_path)


def _too_few_classes(ctx) -> None:
    with pytest.raises(ValueError, match=r"num_classes=2 is smaller than the world size 3"):
        ShardedHead(CosFace(), 4, 2, group=ctx.group)


def _user_errors(ctx) -> None:
    head = ShardedHead(CosFace(), 4, 10, group=ctx.group)
    x = torch.randn(3, 4)
    # A bad label on rank 1 only: every rank raises the same message, nobody hangs.
    labels = torch.tensor([0, 12, 1]) if ctx.rank == 1 else torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"label 12 on rank 1 is outside \[0, num_classes=10\)"):
        head(x, labels)
    labels = torch.tensor([-1, 1, 2]) if ctx.rank == 0 else torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"label -1 on rank 0 is outside"):
        head(x, labels)
    xb = torch.randn(2 if ctx.rank == 1 else 3, 4)
    with pytest.raises(ValueError, match=r"different local batch sizes \[3, 2\]"):
        head(xb, torch.zeros(len(xb), dtype=torch.long))
    xn = x.clone()
    if ctx.rank == 1:
        xn[1, 2] = float("nan")
        xn[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"embeddings on rank 1 contain 2 non-finite values"):
        head(xn, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"must have shape \[B, 4\], got a tensor with shape \[B, 5\]"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    # ... and after all that the head still works.
    assert torch.isfinite(head(x, torch.tensor([0, 1, 2])))


def test_user_errors_raise_clear_messages_on_every_rank(tmp_path):
    run_ranks(_user_errors, 2, tmp_path)


def test_constructor_errors():
    with pytest.raises(ValueError, match="sample_rate must be in"):
        ShardedHead(CosFace(), 4, 10, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ShardedHead(CosFace(), 4, 1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        ShardedHead(CosFace(), 4, 10)(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="boundary_min"):
        GBCosFace(boundary_min=0.8, boundary_max=0.7)


def test_nonfinite_check_can_be_disabled():
    head = ShardedHead(CosFace(), 4, 10, check_inputs=False)
    loss = head(torch.full((2, 4), float("nan")), torch.tensor([0, 1]))
    assert torch.isnan(loss)
