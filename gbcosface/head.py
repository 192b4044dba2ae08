"""The sharded cosine classifier: class rows split across ranks, O(N) collectives per step.

Rank r of W owns classes ``[class_start, class_start + num_local)`` (uneven when C % W != 0). A
step all-gathers the embeddings, forms this rank's ``[N, C_local]`` cosine block, reduces it to
two per-sample scalars (``p_y`` and the negatives' log-sum-exp ``p_n``) with one MAX and one SUM
all-reduce of ``[N]``-sized buffers, and hands them to the margin loss. The block never leaves
the rank, and its backward is formed from the per-sample gradients ``dL/dp_y``, ``dL/dp_n``
(see ``docs/GB-COSFACE.md``). The block is formed in tiles of class rows from the raw
weight (no normalised copy of the shard); ``chunk_size`` (memory-bounded mode) recomputes the
tiles in backward instead of keeping them, so the block is never held whole.
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


# Tile size on CPU when chunk_size is None: the whole block is kept for backward, but it is filled
# and reduced in [N, T] tiles of about this many elements (2 MB of fp32; T = 2048 rows at N = 256),
# so the elementwise passes and the [T, D] row temporaries stay in cache and reuse freed memory
# instead of faulting in fresh pages (1.5x -> 1.23x the GEMM floor on a 2-core CPU, see
# benchmarks/README.md). On accelerators the block is one tile: there, kernel launches cost more.
_TILE_ELEMENTS = 1 << 19
# F.normalize's default: rows shorter than this are divided by it instead of their norm.
_NORM_EPS = 1e-12


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The cosines' dtype: autocast's when it is on (backward runs outside it), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _tile_rows(weight: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Raw weight rows of one tile: a view, or (Partial FC) a gather of the kept rows."""
    return weight[start:stop] if index is None else weight.index_select(0, index[start:stop])


def _unit_rows(w_tile: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``F.normalize`` of one tile's rows given their norms: only a tile is ever normalised, so the
    head holds no normalised copy of its weight (the memory floor is weight + grad + momentum)."""
    return w_tile / norms.clamp(min=_NORM_EPS).unsqueeze(1)


def _tile_cosines(x_c: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """``cos [N, T]`` of unit embeddings and unit rows, in the embeddings' compute dtype."""
    return torch.mm(x_c, w_hat.to(x_c.dtype).t()).clamp_(-1.0, 1.0)


def _positive_in_tile(col: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_tile [N] bool, column [N, 1])``: where the positive lies in this tile (0 elsewhere)."""
    local = col - start
    return (local >= 0) & (local < stop - start), local.clamp(0, stop - start - 1).unsqueeze(1)


class _PositiveAndNegativeLSE(torch.autograd.Function):
    """forward: ``(x_hat [N, D], weight [C_local, D]) -> (p_y [N], p_n [N])`` in fp32, the same on all ranks.

    ``weight`` is the raw (unnormalised) shard; ``index [K]`` (Partial FC, ascending) selects the
    kept rows, or is None for all of them; ``col [N]`` is the positive's column among the K rows,
    -1 where another rank owns it. The K rows are walked in tiles of ``tile``: each tile's cosines
    ``[N, T]`` give ``p_y`` where the positive falls in the tile and update an online (max,
    sum-exp) of the negatives' logits in fp32. The only collectives are an all-reduce MAX of the
    row maxima and one all-reduce SUM of ``[sum-exp * exp(max - global max), p_y]`` packed together.
    With ``keep_block`` the tiles are kept for backward (the ``[N, K]`` block in memory); without
    it (memory-bounded mode) backward recomputes them, one more ``[N, D] x [D, T]`` product each.

    backward, per tile: ``dcos_ij = g_py_i`` at the positive and ``g_pn_i * exp(s cos_ij - s p_n_i)``
    at the negatives (the negatives' softmax); then ``dx_hat += dcos @ w_hat`` (a partial sum: the
    all-gather's reduce-scatter adds the other ranks' parts), ``g = dcos^T @ x_hat`` and, through
    the normalisation (F.normalize's backward, per tile), ``dw_j = (g_j - <g_j, w_hat_j> w_hat_j) / |w_j|``,
    written straight into the tile's rows of the gradient. Only ``[T, D]`` tiles of ``w_hat`` ever
    exist. The clamp of cos to [-1, 1] passes gradients straight through.
    """

    @staticmethod
    def forward(ctx, x_hat, weight, index, col, s: float, group: ProcessGroup | None, tile: int, keep_block: bool):
        dtype = _compute_dtype(x_hat)
        x_c = x_hat.to(dtype)
        n, k = x_hat.shape[0], weight.shape[0] if index is None else index.numel()
        norms = torch.empty(k, device=weight.device)
        p_y = torch.zeros(n, device=x_hat.device)
        # Online (max, sum-exp) of the negatives' logits. The max starts at a floor below any real
        # logit (>= -s), which keeps a row without negatives at sum-exp 0, never NaN.
        row_max = torch.full((n,), -2.0 * s - 1.0, device=x_hat.device)
        sum_exp = torch.zeros(n, device=x_hat.device)
        block = []
        for start in range(0, k, tile):
            stop = min(k, start + tile)
            w_tile = _tile_rows(weight, index, start, stop)
            norms[start:stop] = torch.linalg.vector_norm(w_tile.float(), dim=1)
            cos = _tile_cosines(x_c, _unit_rows(w_tile, norms[start:stop]))
            if keep_block:
                block.append(cos)
            in_tile, at = _positive_in_tile(col, start, stop)
            p_y = torch.where(in_tile, cos.gather(1, at).squeeze(1).float(), p_y)
            logits = cos.float() * s
            logits.scatter_(1, at, torch.where(in_tile.unsqueeze(1), float("-inf"), logits.gather(1, at)))
            new_max = torch.maximum(row_max, logits.amax(dim=1))
            tile_sum = logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
            sum_exp = sum_exp.mul_(torch.exp(row_max - new_max)).add_(tile_sum)
            row_max = new_max
            del cos, logits

        global_max = all_reduce_(row_max.clone(), group, ReduceOp.MAX)
        packed = torch.stack([sum_exp * torch.exp(row_max - global_max), p_y])
        all_reduce_(packed, group, ReduceOp.SUM)
        p_n = (global_max + torch.log(packed[0])) / s
        p_y = packed[1].clone()

        # The tiles go through save_for_backward too, so autograd frees them after backward even
        # while the caller still holds the loss (and its graph) into the next step.
        ctx.s, ctx.tile, ctx.dtype, ctx.keep_block = s, tile, dtype, keep_block
        ctx.save_for_backward(x_hat, weight, index, col, p_n, norms, *block)
        return p_y, p_n

    @staticmethod
    def backward(ctx, g_py, g_pn):
        x_hat, weight, index, col, p_n, norms, *block = ctx.saved_tensors
        s, tile, dtype = ctx.s, ctx.tile, ctx.dtype
        n, k = x_hat.shape[0], norms.shape[0]
        g_py = torch.zeros(n, device=x_hat.device) if g_py is None else g_py.float()
        g_pn = torch.zeros(n, device=x_hat.device) if g_pn is None else g_pn.float()
        x_c = x_hat.to(dtype)
        inv_norm = norms.clamp(min=_NORM_EPS).reciprocal().unsqueeze(1)
        # F.normalize's backward has no projection for rows it divided by eps instead of the norm.
        has_norm = norms > _NORM_EPS
        shift = (-s * p_n).unsqueeze(1)

        dx = torch.zeros(x_hat.shape, device=x_hat.device)
        dw = torch.empty_like(weight) if index is None else torch.zeros_like(weight)
        for i, start in enumerate(range(0, k, tile)):
            stop = min(k, start + tile)
            w_hat = _unit_rows(_tile_rows(weight, index, start, stop), norms[start:stop])
            cos = (block[i] if ctx.keep_block else _tile_cosines(x_c, w_hat)).float()
            dcos = torch.add(shift, cos, alpha=s).exp_().mul_(g_pn.unsqueeze(1))
            in_tile, at = _positive_in_tile(col, start, stop)
            dcos.scatter_(1, at, torch.where(in_tile.unsqueeze(1), g_py.unsqueeze(1), dcos.gather(1, at)))
            del cos
            dcos = dcos.to(dtype)
            dx.add_(torch.mm(dcos, w_hat.to(dtype)))
            # dL/dw_hat goes straight into the gradient's rows when no cast or gather is in between.
            direct = index is None and dtype == dw.dtype
            rows = torch.mm(dcos.t(), x_c, out=dw[start:stop]) if direct else torch.mm(dcos.t(), x_c).to(dw.dtype)
            proj = torch.where(has_norm[start:stop], torch.linalg.vecdot(rows, w_hat), 0.0)
            rows.addcmul_(w_hat, proj.unsqueeze(1), value=-1.0).mul_(inv_norm[start:stop])
            if index is not None:
                dw.index_copy_(0, index[start:stop], rows)
            elif not direct:
                dw[start:stop] = rows
        return dx.to(x_hat.dtype), dw, None, None, None, None, None, None


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

    ``chunk_size`` (memory-bounded mode, docs/GB-COSFACE.md, last section) walks the class rows in
    tiles of that many rows in two passes and never holds the ``[N, C_local]`` block: memory
    beyond weight, gradient and optimizer state is a few ``[N, chunk_size]`` tiles, at the price
    of recomputing the forward product in backward. Same results as the default to rounding.
    Neither mode holds a normalised copy of the weight, and the weight gradient is written once,
    so clear gradients with ``zero_grad(set_to_none=True)`` (the default) to avoid a second
    full-size buffer.
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
        chunk_size: int | None = None,
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
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"ShardedHead: chunk_size must be None or >= 1, got {chunk_size}")
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
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.weight = nn.Parameter(init_rows(self.class_start, self.num_local, embedding_size, seed, init_std))
        self._sampler = torch.Generator().manual_seed(_derived_seed("head-sample", seed, rank))
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def num_sample(self) -> int:
        return min(self.num_local, max(1, math.ceil(self.sample_rate * self.num_local)))

    def extra_repr(self) -> str:
        return (
            f"classes=[{self.class_start}, {self.class_start + self.num_local}) of {self.num_classes}, "
            f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}, chunk_size={self.chunk_size}"
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

        index, col = None, self._local_column(labels)
        if self.sample_rate < 1.0 and self.training:
            index, col = self.sample(labels)

        x_hat = F.normalize(x, dim=1)
        tile = self.chunk_size
        if tile is None:
            tile = max(1, _TILE_ELEMENTS // x.shape[0]) if x.device.type == "cpu" else self.num_local
        p_y, p_n = _PositiveAndNegativeLSE.apply(
            x_hat, self.weight, index, col, self.margin_loss.s, self.group, tile, self.chunk_size is None
        )
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
