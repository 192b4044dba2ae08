"""The sharded cosine classifier: class rows split across ranks, O(N) collectives per step.

Rank r of W owns classes ``[class_start, class_start + num_local)`` (uneven when C % W != 0). A
step all-gathers the embeddings, forms this rank's ``[N, C_local]`` cosine block, reduces it to
two per-sample scalars (``p_y`` and the negatives' log-sum-exp ``p_n``) with one MAX and one SUM
all-reduce of ``[N]``-sized buffers, and hands them to the margin loss. The block never leaves
the rank, and its backward is formed from the per-sample gradients ``dL/dp_y``, ``dL/dp_n``
(see ``shared/design/GB-COSFACE.md``).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup, ReduceOp

from gbcosface.collectives import (
    all_gather_nograd,
    all_gather_with_grad,
    all_reduce_,
    group_rank,
    group_size,
)
from gbcosface.distributed import DistContext
from gbcosface.losses import MarginLoss

# Rows are initialised in blocks of this many classes, each block from its own seed, so the full
# matrix is the same for any world size. Changing it changes every initial weight: don't.
INIT_BLOCK = 4096


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of the classes rank ``rank`` owns: the first C % W ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_rows(start: int, count: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Rows ``[start, start + count)`` of the full initial weight, N(0, std^2), world-size free."""
    out = torch.empty(count, dim)
    first, last = start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK
    for block in range(first, last + 1):
        gen = torch.Generator().manual_seed(_derived_seed("head-init", seed, block))
        rows = torch.randn(INIT_BLOCK, dim, generator=gen).mul_(std)
        lo, hi = max(start, block * INIT_BLOCK), min(start + count, (block + 1) * INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - block * INIT_BLOCK : hi - block * INIT_BLOCK]
    return out


class _PositiveAndNegativeLSE(torch.autograd.Function):
    """forward: ``(x_hat [N, D], w_hat [K, D]) -> (p_y [N], p_n [N])`` in fp32, identical on all ranks.

    ``col [N]`` is the positive's column in this rank's block, -1 where another rank owns it. The
    block ``cos [N, K]`` is kept for backward; the only collectives are an all-reduce MAX of the
    local row maxima and one all-reduce SUM of ``[sum-exp, p_y]`` packed together.

    backward: ``dcos_ij = g_py_i`` at the positive and ``g_pn_i * exp(s cos_ij - s p_n_i)`` at the
    negatives (the negatives' softmax), then ``dx_hat = dcos @ w_hat`` (a partial sum: the
    all-gather's reduce-scatter adds the other ranks' parts) and ``dw_hat = dcos^T @ x_hat``.
    The clamp of cos to [-1, 1] passes gradients straight through.
    """

    @staticmethod
    def forward(ctx, x_hat, w_hat, col, s: float, group: ProcessGroup | None):
        # Under autocast the matmul picks its dtype; otherwise the embeddings' dtype decides
        # (bf16 embeddings from a DeepSpeed bf16 engine give bf16 cosines, fp32 statistics).
        cos = torch.matmul(x_hat, w_hat.t().to(x_hat.dtype)).clamp_(-1.0, 1.0)
        has_pos = col >= 0
        safe_col = col.clamp(min=0).unsqueeze(1)
        p_y = torch.where(has_pos, cos.gather(1, safe_col).squeeze(1).float(), 0.0)

        logits = cos.float() * s
        masked = torch.where(has_pos.unsqueeze(1), float("-inf"), logits.gather(1, safe_col))
        logits.scatter_(1, safe_col, masked)
        # A floor below any real logit (>= -s) keeps an all-masked row at sum-exp 0, never NaN.
        row_max = logits.amax(dim=1).clamp_(min=-2.0 * s - 1.0)
        sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
        del logits

        global_max = all_reduce_(row_max.clone(), group, ReduceOp.MAX)
        packed = torch.stack([sum_exp * torch.exp(row_max - global_max), p_y])
        all_reduce_(packed, group, ReduceOp.SUM)
        p_n = (global_max + torch.log(packed[0])) / s
        p_y = packed[1].clone()

        ctx.s = s
        ctx.save_for_backward(x_hat, w_hat, cos, col, p_n)
        return p_y, p_n

    @staticmethod
    def backward(ctx, g_py, g_pn):
        x_hat, w_hat, cos, col, p_n = ctx.saved_tensors
        s = ctx.s
        n = cos.shape[0]
        g_py = torch.zeros(n, device=cos.device) if g_py is None else g_py.float()
        g_pn = torch.zeros(n, device=cos.device) if g_pn is None else g_pn.float()
        has_pos = col >= 0
        safe_col = col.clamp(min=0).unsqueeze(1)

        dcos = cos.float().mul(s).sub_((s * p_n).unsqueeze(1)).exp_().mul_(g_pn.unsqueeze(1))
        at_pos = torch.where(has_pos, g_py, dcos.gather(1, safe_col).squeeze(1))
        dcos.scatter_(1, safe_col, at_pos.unsqueeze(1))

        dcos = dcos.to(cos.dtype)
        dx_hat = torch.matmul(dcos, w_hat.to(cos.dtype)).to(x_hat.dtype)
        dw_hat = torch.matmul(dcos.t(), x_hat.to(cos.dtype)).to(w_hat.dtype)
        return dx_hat, dw_hat, None, None, None


class ShardedHead(nn.Module):
    """This rank's rows of a cosine classifier, and the margin loss over all ranks' classes.

    ``forward(local_embeddings [B, D], local_labels [B]) -> loss``: the same scalar on every rank,
    the mean over the global batch (B equal on every rank). See :mod:`gbcosface.collectives` for
    the gradient contract; ``embedding_grad_scale`` is set to the world size by the engine when the
    backbone's gradients are averaged by DDP or DeepSpeed.

    ``sample_rate < 1`` enables Partial FC sampling in training mode: the rank keeps every class
    it owns that is a positive of the global batch, plus a random subset of its other classes
    (``max(ceil(rate * num_local), positives)`` rows in all), drawn from a generator seeded by
    (seed, rank) whose state is part of ``state_dict()``. Counting the positives is the step's one
    host synchronisation; without sampling the loss has none.

    ``check_inputs`` gathers ``[B, D, label range, non-finite count]`` from every rank once per
    step (one tiny all-gather and one host read) so that a user's mistake raises the same clear
    error on every rank instead of a hang or a NaN.
    """

    def __init__(
        self,
        margin_loss: MarginLoss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        group: ProcessGroup | DistContext | None = None,
        *,
        seed: int = 0,
        init_std: float = 0.01,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(group, DistContext):
            group = group.group
        world, rank = group_size(group), group_rank(group)
        if num_classes < 2:
            raise ValueError(f"ShardedHead: num_classes must be >= 2 (a margin loss needs negatives), got {num_classes}")
        if num_classes < world:
            raise ValueError(
                f"ShardedHead: num_classes={num_classes} is smaller than the world size {world}; "
                "every rank must own at least one class"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"ShardedHead: sample_rate must be in (0, 1], got {sample_rate}")
        if embedding_size <= 0:
            raise ValueError(f"ShardedHead: embedding_size must be > 0, got {embedding_size}")
        self.margin_loss = margin_loss
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate = float(sample_rate)
        self.group, self.rank, self.world_size = group, rank, world
        self.class_start, self.num_local = class_range(num_classes, world, rank)
        self.seed = int(seed)
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.check_inputs = check_inputs
        self.weight = nn.Parameter(init_rows(self.class_start, self.num_local, embedding_size, seed, init_std))
        self._sampler = torch.Generator().manual_seed(_derived_seed("head-sample", seed, rank))
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def num_sample(self) -> int:
        return min(self.num_local, max(1, math.ceil(self.sample_rate * self.num_local)))

    def extra_repr(self) -> str:
        return (
            f"classes=[{self.class_start}, {self.class_start + self.num_local}) of {self.num_classes}, "
            f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}"
        )

    def get_extra_state(self) -> dict:
        return {"sampler_state": self._sampler.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._sampler.set_state(state["sampler_state"])

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            self._check(local_embeddings, local_labels)
        x = all_gather_with_grad(local_embeddings, self.group, self.embedding_grad_scale)
        labels = all_gather_nograd(local_labels.to(device=x.device, dtype=torch.long), self.group)

        weight, col = self.weight, self._local_column(labels)
        if self.sample_rate < 1.0 and self.training:
            index, col = self.sample(labels)
            weight = self.weight.index_select(0, index)

        x_hat = F.normalize(x, dim=1)
        w_hat = F.normalize(weight, dim=1)
        p_y, p_n = _PositiveAndNegativeLSE.apply(x_hat, w_hat, col, self.margin_loss.s, self.group)
        out = self.margin_loss(p_y, p_n, self.group)
        loss = out.per_sample.mean()
        self.last_stats = {
            "loss": loss.detach(),
            "p_y": p_y.detach().mean(),
            "p_n": p_n.detach().mean(),
            **out.terms,
        }
        return loss

    def _local_column(self, labels: torch.Tensor) -> torch.Tensor:
        local = labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, -1)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: ``(kept row indices [K] ascending, positive column in the kept block [N])``."""
        n = self.num_local
        local = self._local_column(labels)
        slot = torch.where(local >= 0, local, n)
        is_pos = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
        is_pos[slot] = True
        is_pos = is_pos[:n]
        k = min(n, max(self.num_sample, int(is_pos.sum())))
        score = torch.rand(n, generator=self._sampler).to(labels.device)
        score = torch.where(is_pos, 2.0, score)
        index = torch.topk(score, k, sorted=False).indices.sort().values
        remap = torch.full((n + 1,), -1, dtype=torch.long, device=labels.device)
        remap[index] = torch.arange(k, device=labels.device)
        return index, remap[slot]

    @torch.no_grad()
    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"ShardedHead: labels must be an integer tensor, got {labels.dtype}")
        b = embeddings.shape[0] if embeddings.dim() >= 1 else 0
        d = embeddings.shape[1] if embeddings.dim() == 2 else -1
        dev, f64 = embeddings.device, torch.float64
        empty = labels.numel() == 0
        mine = torch.stack(
            [
                torch.tensor(float(b), dtype=f64, device=dev),
                torch.tensor(float(d), dtype=f64, device=dev),
                torch.tensor(float(labels.numel()), dtype=f64, device=dev),
                torch.zeros((), dtype=f64, device=dev) if empty else labels.min().to(dev, f64),
                torch.zeros((), dtype=f64, device=dev) if empty else labels.max().to(dev, f64),
                (~torch.isfinite(embeddings)).sum().to(f64),
            ]
        )
        rows = all_gather_nograd(mine, self.group).view(self.world_size, 6).tolist()

        sizes = [int(r[0]) for r in rows]
        for rank, (b, d, nl, lo, hi, bad) in enumerate(rows):
            where = f" on rank {rank}" if self.world_size > 1 else ""
            if d != self.embedding_size:
                raise ValueError(
                    f"ShardedHead: embeddings{where} must have shape [B, {self.embedding_size}], "
                    f"got a tensor with {'shape [B, %d]' % d if d >= 0 else 'the wrong number of dims'}"
                )
            if b < 1:
                raise ValueError(f"ShardedHead: empty batch{where}")
            if nl != b:
                raise ValueError(f"ShardedHead: {int(b)} embeddings but {int(nl)} labels{where}")
            if lo < 0 or hi >= self.num_classes:
                bad_label = int(lo) if lo < 0 else int(hi)
                raise ValueError(
                    f"ShardedHead: label {bad_label}{where} is outside [0, num_classes={self.num_classes}); "
                    "check the configured number of classes against the data set"
                )
            if bad > 0:
                raise FloatingPointError(
                    f"ShardedHead: the embeddings{where} contain {int(bad)} non-finite values (NaN/Inf): "
                    "the backbone diverged (lower the learning rate, check AMP) or the input is corrupt"
                )
        if len(set(sizes)) > 1:
            raise ValueError(
                f"ShardedHead: ranks have different local batch sizes {sizes}; every rank must feed "
                "the same batch size (drop the last incomplete batch)"
            )
