"""The backbone's data-parallel wrapper: DDP or a DeepSpeed engine. The head stays outside both.

Both wrappers AVERAGE the backbone gradients over the W ranks. The sharded head's all-gather
hands each rank the exact gradient of the global loss w.r.t. its own embeddings, so the sum over
ranks is the single-process gradient; the head is therefore told to scale the embedding
gradient by W (``ShardedHead.embedding_grad_scale``) and the average becomes the exact gradient
(see :mod:`gbcosface.collectives`). The head's weight shard is never handed to either wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gbcosface.config import Config
from gbcosface.distributed import DistContext


def make_optimizer(params, cfg: Config, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW from the ``[optim]`` section."""
    params = [p for p in params if p.requires_grad]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=weight_decay)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {cfg.optim.name!r}; choose 'sgd' or 'adamw'")


class DDPEngine:
    """Backbone in DDP (or bare in a single process), its optimizer, and the fp16 grad scaler."""

    kind = "ddp"

    def __init__(self, backbone: nn.Module, cfg: Config, ctx: DistContext) -> None:
        self.backbone = backbone.to(ctx.device)
        self.model: nn.Module = self.backbone
        if ctx.is_distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DDP(self.backbone, device_ids=ids, process_group=ctx.group)
        self.optimizer = make_optimizer(self.backbone.parameters(), cfg, cfg.optim.lr, cfg.optim.weight_decay)
        self.grad_accum = cfg.optim.grad_accum
        self.amp = cfg.train.amp
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        self.device = ctx.device
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.input_dtype = torch.float32

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def no_sync(self, active: bool):
        """Skip DDP's all-reduce on accumulation micro-steps (the last one reduces the sum)."""
        if active and isinstance(self.model, DDP):
            return self.model.no_sync()
        return _nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, head_optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.scaler.unscale_(head_optimizer)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.backbone.parameters() if p.grad is not None]

    def step(self, head_optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.step(head_optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
            head_optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step_done(self) -> None:
        """DeepSpeed counts micro-steps itself; DDP needs nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, folder: Path) -> None:
        """DDP's state lives in the common checkpoint files."""

    def load_extra(self, folder: Path) -> bool:
        return False


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def deepspeed_config(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    """The JSON given in ``deepspeed.config``, or one built from the run's sections.

    Batch sizes and accumulation always come from ``[data]``/``[optim]`` so the two cannot
    disagree; precision follows ``train.amp`` (``validate`` refuses a JSON that disagrees).
    """
    if cfg.deepspeed.config:
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
    else:
        ds = {"zero_optimization": {"stage": cfg.deepspeed.zero_stage}}
        if cfg.train.amp == "bf16":
            ds["bf16"] = {"enabled": True}
        elif cfg.train.amp == "fp16":
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.optim.grad_accum * ctx.world_size
    ds.setdefault("gradient_clipping", cfg.optim.grad_clip)
    # torch's SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it works (measured).
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


class DeepSpeedEngine:
    """Backbone in a DeepSpeed engine (ZeRO 0, 1 or 2; bf16 from the config).

    DeepSpeed averages gradients, divides the loss by the accumulation steps and clips the
    backbone's gradient norm to ``optim.grad_clip`` by itself; the head shard is clipped by the
    trainer with its own norm (summed over ranks). Under fp16 DeepSpeed's loss scale also
    multiplies the head's gradients (the backward runs through the head), so they are divided by
    the current scale before clipping, and the head skips every step DeepSpeed skips for overflow.
    """

    kind = "deepspeed"

    def __init__(self, backbone: nn.Module, cfg: Config, ctx: DistContext) -> None:
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(f"train.engine = 'deepspeed' needs DeepSpeed (pip install gbcosface[deepspeed]): {exc}") from None
        ds = deepspeed_config(cfg, ctx)
        if ds.get("zero_optimization", {}).get("stage", 0) > 2:
            raise ValueError("deepspeed: ZeRO stage 3 partitions the backbone's parameters; use stage 0, 1 or 2")
        self.backbone = backbone.to(ctx.device)
        optimizer = make_optimizer(self.backbone.parameters(), cfg, cfg.optim.lr, cfg.optim.weight_decay)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=self.backbone, optimizer=optimizer, config=ds, dist_init_required=False)
        self.fp16 = bool(self.model.fp16_enabled())
        self.input_dtype = torch.float16 if self.fp16 else \
            torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
        if self.input_dtype != torch.float32:
            # DeepSpeed casts the parameters to bf16/fp16 but (at least on CPU) not the buffers;
            # BatchNorm then refuses low-precision input against fp32 running statistics.
            for buf in self.backbone.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(self.input_dtype)
        self.scaler = None

    def autocast(self):
        return _nullcontext()  # DeepSpeed casts the model itself

    def no_sync(self, active: bool):
        return _nullcontext()  # DeepSpeed defers the reduction to the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def loss_scale(self) -> float:
        """DeepSpeed's current fp16 loss scale (1 without fp16)."""
        if not self.fp16:
            return 1.0
        opt = self.model.optimizer
        config = getattr(opt, "loss_scale_config", None)
        return float(config.cur_scale if config is not None else opt.cur_scale)

    def unscale_(self, head_optimizer: torch.optim.Optimizer) -> None:
        scale = self.loss_scale()
        if scale != 1.0:
            for group in head_optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(scale)

    def grads(self) -> list[torch.Tensor]:
        return []  # partitioned inside ZeRO; DeepSpeed clips them and reports the norm

    def step(self, head_optimizer: torch.optim.Optimizer) -> bool:
        """Returns False when DeepSpeed skipped the step (fp16 overflow); the head skips it too."""
        skipped = self.model.skipped_steps
        self.model.step()
        if self.model.skipped_steps != skipped:
            return False
        head_optimizer.step()
        return True

    def micro_step_done(self) -> None:
        """DeepSpeed's step() must see every micro-step to know where the boundary is."""
        self.model.step()

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_extra(self, folder: Path) -> None:
        """DeepSpeed writes its own (possibly partitioned) optimizer files; every rank calls it."""
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_extra(self, folder: Path) -> bool:
        path = folder / "deepspeed"
        if not path.is_dir():
            return False
        self.model.load_checkpoint(str(path), tag="state", load_module_strict=True,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        return True


def build_engine(backbone: nn.Module, cfg: Config, ctx: DistContext) -> DDPEngine | DeepSpeedEngine:
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(backbone, cfg, ctx)
    if cfg.train.engine == "ddp":
        if cfg.train.amp == "fp16" and ctx.device.type != "cuda":
            raise ValueError("train.amp = 'fp16' with DDP needs a CUDA device (torch's grad scaler); "
                             "use 'bf16' on CPU, or train.engine = 'deepspeed'")
        return DDPEngine(backbone, cfg, ctx)
    raise ValueError(f"train.engine: unknown engine {cfg.train.engine!r}; choose 'ddp' or 'deepspeed'")
