"""The training loop: data -> backbone (DDP/DeepSpeed) -> sharded head -> margin loss -> step.

One optimizer step: ``grad_accum`` micro-steps of forward and backward, one small all-reduce
that sums the head shards' squared gradient norms together with the stop flag, clipping of the
joint norm, and the two optimizers (backbone, head shard). Checkpoints, verification and logging
run between steps. Only rank 0 prints and writes TensorBoard events.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed import ReduceOp

from gbcosface import checkpoint as ckpt
from gbcosface.backbones import build_backbone
from gbcosface.collectives import all_reduce_
from gbcosface.config import Config
from gbcosface.data.loader import build_loader_from_config
from gbcosface.data.recordio import RecordIOError
from gbcosface.distributed import DistContext
from gbcosface.engine import build_engine, make_optimizer
from gbcosface.head import ShardedHead
from gbcosface.losses import build_margin_loss
from gbcosface.metrics import Throughput, make_logger, memory_stats
from gbcosface.preflight import run_preflight
from gbcosface.progress import format_duration

log = logging.getLogger("gbcosface.trainer")

_LOSS_PARAMS = {
    "gbcosface": ("s", "m", "alpha", "update_rate", "boundary_min", "boundary_max"),
    "cosface": ("s", "m"),
    "arcface": ("s", "m"),
}


def summarize(result: dict[str, Any], tensorboard_dir: Path | None) -> str:
    """The end-of-run report: verification before and after training, and where the logs are."""
    from gbcosface.eval.roc import format_table

    lines = [f"training {result['status']} at step {result['step']}"]
    if result["after"]:
        rows, accuracy = {}, []
        for when in ("before", "after"):
            for name, res in result[when].items():
                rows[f"{name} {when}"] = (res.tar_at_far, res.min_far)
                accuracy.append(f"{name} {when:<6}  accuracy {100 * res.accuracy:6.2f}% +- {100 * res.accuracy_std:.2f}"
                                f"  ({len(res.labels)} pairs)")
        lines += ["", "held-out verification (10-fold accuracy, TAR@FAR in %):", *accuracy, "",
                  format_table(rows, title="TAR@FAR")]
    if tensorboard_dir is not None:
        lines += ["", f"TensorBoard logs: {tensorboard_dir}   (tensorboard --logdir {tensorboard_dir})"]
    return "\n".join(lines)


class NonFiniteLossError(FloatingPointError):
    """Too many non-finite losses in a row: the run stopped (after a checkpoint)."""


class DataError(ValueError):
    """A training record could not be used; the message names the file, key and byte offset."""


class DistributedJobError(RuntimeError):
    """A collective timed out or lost a peer rank; the message says what to check."""


# What gloo, NCCL and the c10d store say when a peer is slow or gone (matched case-insensitively).
_TIMEOUT_WORDS = ("timed out", "timeout")
_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "pair closure",
                    "nccl error", "connection refused")


def explain_distributed_error(exc: BaseException, step: int, timeout_s: float) -> DistributedJobError | None:
    """A :class:`DistributedJobError` saying what a raw collective failure means, or ``None``
    when ``exc`` is not one."""
    text = str(exc)
    low = text.lower()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if any(w in low for w in _TIMEOUT_WORDS):
        return DistributedJobError(
            f"step {step}: a collective did not complete within train.timeout_s = {timeout_s:g} s ({first}). "
            "Another rank is stuck or died: look for the first error in the other ranks' logs; check for a rank "
            "starved by slow data loading, the network between nodes, or raise train.timeout_s if a step "
            "legitimately takes that long")
    if any(w in low for w in _PEER_LOST_WORDS):
        return DistributedJobError(
            f"step {step}: another rank left the job ({first}). Its own log names the cause; the job can "
            "resume from the last complete checkpoint (train.resume = 'auto')")
    return None


def explain_data_error(exc: BaseException) -> DataError | None:
    """A :class:`DataError` from a record error, raised here or inside a DataLoader worker
    (which re-raises it as a RuntimeError carrying the worker's traceback text)."""
    if isinstance(exc, RecordIOError):
        message = str(exc)
    elif isinstance(exc, RuntimeError) and "Caught CorruptRecordError" in str(exc):
        marker = "CorruptRecordError: "
        message = str(exc).strip().splitlines()[-1]
        message = message.split(marker, 1)[1] if marker in message else message
    else:
        return None
    return DataError(f"{message} (set data.skip_corrupt = true to skip and count such records, or repack the "
                     "data; `python -m gbcosface.data.pack inspect --check` lists every bad record)")


def lr_factor(step: int, cfg: Config, steps_per_epoch: int, total_steps: int) -> float:
    """Warmup (linear from 0) then poly decay to 0 or step decay at epoch milestones."""
    o = cfg.optim
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if o.lr_schedule == "step":
        passed = sum(1 for e in o.milestones if step >= e * steps_per_epoch)
        return o.gamma ** passed
    span = max(1, total_steps - warmup)
    return max(0.0, 1.0 - (step - warmup) / span) ** o.power


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)  # the same backbone initialisation on every rank


def build_head(cfg: Config, ctx: DistContext) -> ShardedHead:
    params = {k: getattr(cfg.loss, k) for k in _LOSS_PARAMS[cfg.loss.name]}
    margin = build_margin_loss(cfg.loss.name, **params)
    head = ShardedHead(margin, cfg.backbone.embedding_size, cfg.data.num_classes, cfg.head.sample_rate,
                       group=ctx.group, seed=cfg.head.seed,
                       embedding_grad_scale=float(ctx.world_size))  # DDP/DeepSpeed average: see engine.py
    return head.to(ctx.device)


@dataclass
class StepStats:
    """Device-side sums over the steps since the last log line (no host sync until logged)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k].reshape(()) for k in keys]).div_(self.count).tolist()
        return dict(zip(keys, values))


class Trainer:
    """Builds everything from a validated config and a DistContext; ``fit()`` trains.

    ``stop_requested`` (set by a SIGTERM handler in ``train_dist.py``) is agreed on by all ranks
    at the next step, which then saves a checkpoint and returns.

    Construction starts with the pre-flight checks (:mod:`gbcosface.preflight`): a bad config,
    missing data, labels outside the classes, an unwritable or full output folder, or an
    incompatible checkpoint raise the same ``PreflightError`` on every rank before any work.
    """

    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        resume_from = run_preflight(cfg, ctx)
        self.cfg, self.ctx = cfg, ctx
        self.stop_requested = False
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.train.seed, ctx.rank)

        options = {"dropout": cfg.backbone.dropout} if cfg.backbone.dropout else {}  # tiny has no dropout
        backbone = build_backbone(cfg.backbone.name, cfg.backbone.embedding_size, **options)
        self.engine = build_engine(backbone, cfg, ctx)
        self.head = build_head(cfg, ctx)
        head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
        self.head_lr = head_lr
        self.head_optimizer = make_optimizer(self.head.parameters(), cfg, head_lr, cfg.optim.weight_decay)

        self.loader = build_loader_from_config(cfg.data, ctx)
        self.steps_per_epoch = len(self.loader) // cfg.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"data: {len(self.loader)} batches per epoch on each rank is fewer than "
                             f"optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.global_batch = cfg.data.batch_size * ctx.world_size * cfg.optim.grad_accum

        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.output = Path(cfg.train.output)
        self.logger = make_logger(ctx, cfg.tensorboard_dir if cfg.log.tensorboard else None)
        self.verification_sets = self._load_verification_sets()
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None
        self.last_saved_step = -1
        self._resume(resume_from)

    # ------------------------------------------------------------------ state

    def _head_shard(self) -> ckpt.HeadShard:
        rows, rest = ckpt.split_optimizer_rows(self.head_optimizer.state_dict(), self.head.num_local)
        return ckpt.HeadShard(self.head.class_start, self.head.num_local, self.head.weight.detach(), rows, rest)

    def save(self) -> Path:
        """A checkpoint of everything at the current step (collective)."""
        train_state = {
            "loss_state": {k: v.cpu() for k, v in self.head.margin_loss.state_dict().items()},
            "data": self.loader.state_dict(),
            "nonfinite_total": self.nonfinite_total,
        }
        path = ckpt.save_checkpoint(
            self.cfg.checkpoint_dir, ctx=self.ctx, step=self.step, epoch=self.loader.state_dict()["epoch"],
            config=self.cfg, head=self._head_shard(), train_state=train_state,
            backbone={k: v.cpu() for k, v in self.engine.backbone.state_dict().items()},
            backbone_optim=self.engine.state_dict() or None,
            rank_state={"head_extra": self.head.get_extra_state()}, keep=self.cfg.checkpoint.keep,
            extra_writer=self.engine.save_extra if self.engine.kind == "deepspeed" else None)
        self.last_saved_step = self.step
        if self.ctx.is_main:
            log.info("checkpoint %s", path)
        return path

    def _resume(self, path: Path | None) -> None:
        """Load ``path`` (the checkpoint the pre-flight checks chose on rank 0), if any."""
        if path is None:
            return
        loaded = ckpt.load_checkpoint(path, self.ctx, num_classes=self.cfg.data.num_classes,
                                      embedding_size=self.cfg.backbone.embedding_size,
                                      class_start=self.head.class_start, num_local=self.head.num_local)
        dev = self.ctx.device
        self.engine.backbone.load_state_dict(loaded.backbone)
        with torch.no_grad():
            self.head.weight.copy_(loaded.head.weight.to(dev))
        head_state = ckpt.join_optimizer_rows({k: v.to(dev) for k, v in loaded.head.optimizer.items()},
                                              loaded.head.optimizer_rest)
        if head_state["state"]:
            self.head_optimizer.load_state_dict(head_state)
        ts = loaded.train_state
        self.head.margin_loss.load_state_dict({k: v.to(dev) for k, v in ts["loss_state"].items()})
        self.loader.load_state_dict(ts["data"])
        if not self.engine.load_extra(path) and loaded.backbone_optim:
            self.engine.load_state_dict(loaded.backbone_optim)
        self.step = int(ts["step"])
        self.nonfinite_total = int(ts.get("nonfinite_total", 0))
        if loaded.rank_state is not None:
            ckpt.restore_rng_state(loaded.rank_state["rng"], dev)
            self.head.set_extra_state(loaded.rank_state["head_extra"])
        self.resumed_from = path
        self.last_saved_step = self.step
        if self.ctx.is_main:
            moved = "" if loaded.rank_state is not None else \
                f" (saved on {loaded.manifest['world_size']} ranks, head rows re-sharded onto {self.ctx.world_size})"
            log.info("resumed from %s at step %d%s", path, self.step, moved)

    # ------------------------------------------------------------------ evaluation

    def _load_verification_sets(self) -> list:
        if not self.cfg.eval.bins:
            return []
        from gbcosface.eval.verification import load_bin

        return [load_bin(p) for p in self.cfg.eval.bins]

    def verify(self) -> dict[str, Any]:
        """Verification on every configured .bin set (collective); logged to TensorBoard."""
        from gbcosface.eval.verification import verify

        results = {}
        for vset in self.verification_sets:
            res = verify(self.engine.backbone, vset, self.ctx, self.cfg.eval.batch_size)
            results[vset.name] = res
            self.logger.scalar(f"verify/{vset.name}/accuracy", res.accuracy, self.step)
            for far, tar in res.tar_at_far.items():
                self.logger.scalar(f"verify/{vset.name}/tar@far={far:g}", tar, self.step)
            if self.ctx.is_main:
                log.info("step %d verify %s", self.step, res.summary())
        return results

    # ------------------------------------------------------------------ the loop

    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.cfg, self.steps_per_epoch, self.total_steps)
        self.engine.set_lr(self.cfg.optim.lr * factor)
        for group in self.head_optimizer.param_groups:
            group["lr"] = self.head_lr * factor
        return self.cfg.optim.lr * factor

    def _clip(self) -> torch.Tensor:
        """Joint gradient norm of the backbone (replicated) and all head shards (summed over
        ranks); clipped to ``optim.grad_clip``; returns the norm before clipping. Also carries
        the stop flag in the same all-reduce."""
        head_grads = [p.grad for p in self.head.parameters() if p.grad is not None]
        head_sq = torch.stack([g.float().pow(2).sum() for g in head_grads]).sum() if head_grads \
            else torch.zeros((), device=self.ctx.device)
        packed = torch.stack([head_sq, torch.tensor(float(self.stop_requested), device=head_sq.device)])
        all_reduce_(packed, self.ctx.group, ReduceOp.SUM)
        self._stop_agreed = packed[1]
        bb_grads = self.engine.grads()
        bb_sq = torch.stack([g.float().pow(2).sum() for g in bb_grads]).sum() if bb_grads \
            else torch.zeros((), device=head_sq.device)
        norm = (bb_sq + packed[0]).sqrt()
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            for g in bb_grads + head_grads:
                g.mul_(coef.to(g.dtype))
        return norm

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
        engine = self.engine
        images = images.to(engine.input_dtype)
        with engine.no_sync(not last):
            with engine.autocast():
                embeddings = engine.model(images)
            try:
                loss = self.head(embeddings, labels)
            except FloatingPointError:
                # Non-finite embeddings: the head refused them on every rank alike. Run a
                # backward anyway so DDP's reducer finishes its round; the step is skipped.
                loss = embeddings.float().sum() * 0.0 + float("nan")
            engine.backward(loss)
        if not last:
            engine.micro_step_done()
        return loss.detach()

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over ``grad_accum`` micro-batches. Returns device-side stats, or
        ``None`` when the step was skipped for a non-finite loss."""
        lr = self._set_lr()
        loss_state = {k: v.clone() for k, v in self.head.margin_loss.state_dict().items()}
        losses = [self._micro_step(x, y, i == len(batches) - 1) for i, (x, y) in enumerate(batches)]
        loss = torch.stack(losses).mean()
        stats = {**self.head.last_stats, "loss": loss}
        self.engine.unscale_(self.head_optimizer)
        norm = self._clip()
        finite = bool(torch.isfinite(loss))  # the step's one host read; the loss is the same on all ranks
        if not finite:
            self.head.margin_loss.load_state_dict(loss_state)  # a NaN batch must not move the boundary
            self.head_optimizer.zero_grad(set_to_none=True)
            self.engine.zero_grad()
            if self.engine.kind == "deepspeed":
                raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} under DeepSpeed, which "
                                         "cannot skip a step: lower the learning rate or check the data")
            return None
        self.engine.step(self.head_optimizer)
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats["grad_norm"] = norm
        stats["lr"] = torch.tensor(lr)
        stats["boundary"] = getattr(self.head.margin_loss, "boundary", torch.tensor([float("nan")]))[0]
        return stats

    def _batches(self):
        """Groups of ``grad_accum`` micro-batches, epoch after epoch, from the loader's position."""
        accum = self.cfg.optim.grad_accum
        while self.loader.state_dict()["epoch"] < self.cfg.train.epochs:
            group = []  # a remainder of fewer than grad_accum batches is dropped at the epoch's end
            batches = iter(self.loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as exc:
                    data_error = explain_data_error(exc)
                    if data_error is None:
                        raise
                    raise data_error from None
                group.append(batch)
                if len(group) == accum:
                    yield group
                    group = []

    def fit(self) -> dict[str, Any]:
        """Train to the end, or until a stop is agreed; returns the step, status and history.

        Raises :class:`NonFiniteLossError` (after a checkpoint), :class:`DataError` for an
        unusable record, and :class:`DistributedJobError` when a collective times out or a
        peer rank is gone.
        """
        try:
            return self._fit()
        except RuntimeError as exc:
            if isinstance(exc, DistributedJobError):
                raise
            explained = explain_distributed_error(exc, self.step + 1, self.cfg.train.timeout_s) \
                if self.ctx.is_distributed else None
            if explained is None:
                raise
            raise explained from exc

    def _fit(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        before = self.verify() if self.verification_sets and self.resumed_from is None else {}
        meter, acc = Throughput(window=max(2, cfg.train.log_every)), StepStats()
        meter.start()
        t_start, start_step = time.perf_counter(), self.step
        self._stop_agreed = torch.zeros(())
        stopped = "finished"
        for batches in self._batches():
            if self.step >= self.total_steps:
                break
            stats = self.train_step(batches)
            if stats is None:
                self.nonfinite_total += 1
                self.nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in all)",
                            self.step + 1, self.nonfinite_in_a_row, self.nonfinite_total)
                self.logger.scalar("train/nonfinite_total", self.nonfinite_total, self.step + 1)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    path = self.save()
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite losses in a row up to step {self.step + 1}; "
                        f"stopped with checkpoint {path}. Lower optim.lr, use train.amp='bf16' instead of "
                        "fp16, or check the data")
                if float(self._stop_agreed) > 0:
                    stopped = "stop requested"
                    break
                continue
            self.nonfinite_in_a_row = 0
            acc.add(stats)
            meter.update(self.global_batch)
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                self._log(acc.means(), meter.rate(), t_start, start_step)
                acc = StepStats()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                self.verify()
                meter.start()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
            if float(self._stop_agreed) > 0:
                stopped = "stop requested"
                break
        if self.last_saved_step != self.step:
            self.save()
        after = self.verify() if self.verification_sets and stopped == "finished" else {}
        if stopped == "finished" and ctx.is_main:
            self.export()
        self.logger.flush()
        return {"step": self.step, "status": stopped, "before": before, "after": after, "history": self.history}

    def export(self) -> Path:
        from gbcosface.export import save_backbone

        path = self.output / "model.pt"
        save_backbone(path, self.cfg.backbone.name, self.engine.backbone,
                      embedding_size=self.cfg.backbone.embedding_size, step=self.step)
        log.info("backbone exported to %s", path)
        return path

    def _log(self, means: dict[str, float], rate: float, t_start: float, start_step: int) -> None:
        means = {**means, "images_per_s": rate, "nonfinite_total": float(self.nonfinite_total)}
        means.update(memory_stats(self.ctx.device))
        self.history.append({"step": float(self.step), **means})
        tags = {f"train/{k}": v for k, v in means.items() if not k.startswith("memory/")}
        tags.update({k: v for k, v in means.items() if k.startswith("memory/")})
        self.logger.scalars(tags, self.step)
        if self.ctx.is_main:
            done = self.step - start_step
            elapsed = time.perf_counter() - t_start
            eta = (self.total_steps - self.step) * elapsed / done if done else math.nan
            epoch = self.step / self.steps_per_epoch
            line = (f"step {self.step}/{self.total_steps} (epoch {epoch:.2f}) | loss {means['loss']:.4f} | "
                    f"boundary {means.get('boundary', math.nan):.4f} | lr {means['lr']:.4g} | "
                    f"{rate:.0f} img/s | ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
            print(line, flush=True)
