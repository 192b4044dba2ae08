"""Pieces of the training loop: LR schedule, gradient accumulation, joint clipping, bf16 autocast,
DeepSpeed resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from gbcosface.config import config_from_dict
from gbcosface.trainer import lr_factor
from tests.dist_utils import run_ranks
from tests.optional import require
from tests.test_trainer import make_config, synthetic, train  # noqa: F401  (synthetic is a fixture)


def schedule_config(schedule: str, warmup: float, milestones=()):
    return config_from_dict({"optim": {"lr_schedule": schedule, "warmup_epochs": warmup,
                                       "milestones": list(milestones), "gamma": 0.1, "power": 2.0},
                             "train": {"epochs": 10}})


def test_lr_warmup_then_poly():
    cfg = schedule_config("poly", 1.0)
    spe, total = 10, 100
    got = [lr_factor(s, cfg, spe, total) for s in range(total)]
    for s in range(10):
        assert got[s] == pytest.approx((s + 1) / 10)
    for s in range(10, total):
        assert got[s] == pytest.approx((1 - (s - 10) / 90) ** 2)
    assert got[10] == pytest.approx(1.0) and got[-1] < 1e-3


def test_lr_step_schedule_at_epoch_milestones():
    cfg = schedule_config("step", 0.0, milestones=(2, 5))
    spe = 7
    assert lr_factor(0, cfg, spe, 70) == 1.0
    assert lr_factor(2 * spe - 1, cfg, spe, 70) == 1.0
    assert lr_factor(2 * spe, cfg, spe, 70) == pytest.approx(0.1)
    assert lr_factor(5 * spe, cfg, spe, 70) == pytest.approx(0.01)


def _trainer(ctx, synthetic: dict, tmp: str, **sections):
    from gbcosface.trainer import Trainer

    cfg = make_config(synthetic, Path(tmp), **sections)
    return Trainer(config_from_dict(cfg), ctx)


def _accumulation(ctx, synthetic: dict, tmp: str) -> None:
    """accum=2 x 4 images equals accum=1 x 8 images (CosFace; BN frozen so samples are independent)."""
    gen = torch.Generator().manual_seed(ctx.rank)
    images = torch.randn(8, 3, 112, 112, generator=gen)
    labels = torch.randint(0, synthetic["classes"], (8,), generator=gen)
    params = []
    for accum, batch in ((1, 8), (2, 4)):
        torch.manual_seed(0)
        t = _trainer(ctx, synthetic, f"{tmp}/a{accum}", loss={"name": "cosface", "s": 16.0, "m": 0.2},
                     data={"batch_size": batch}, optim={"grad_accum": accum, "grad_clip": 0.0})
        t.engine.backbone.eval()

        def flat():
            return torch.cat([p.detach().flatten() for p in t.engine.backbone.parameters()]
                             + [t.head.weight.detach().flatten()])

        initial = flat()
        chunks = [(images[i:i + batch], labels[i:i + batch]) for i in range(0, 8, batch)]
        assert t.train_step(chunks) is not None
        params.append(flat())
        assert not torch.allclose(params[-1], initial)  # the step moved the weights
    assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_gradient_accumulation_averages(synthetic, tmp_path, world):  # noqa: F811
    run_ranks(_accumulation, world, tmp_path, synthetic, str(tmp_path))


def _clipping(ctx, synthetic: dict, tmp: str) -> None:
    """The clipped norm counts the backbone once and every head shard once."""
    t = _trainer(ctx, synthetic, tmp, optim={"grad_clip": 0.0})
    gen = torch.Generator().manual_seed(10 + ctx.rank)
    images = torch.randn(8, 3, 112, 112, generator=gen)
    labels = torch.randint(0, synthetic["classes"], (8,), generator=gen)
    t._micro_step(images, labels, last=True)
    head_sq = t.head.weight.grad.pow(2).sum()
    parts = [torch.zeros(()) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(parts, head_sq, group=ctx.group) if ctx.world_size > 1 else parts.__setitem__(0, head_sq)
    backbone_sq = sum(p.grad.pow(2).sum() for p in t.engine.backbone.parameters() if p.grad is not None)
    expected = math.sqrt(float(backbone_sq) + float(sum(parts)))
    assert_close(t._clip(), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    t.cfg.optim.grad_clip = expected / 4
    t._clip()
    after = sum(p.grad.pow(2).sum() for p in t.engine.backbone.parameters() if p.grad is not None)
    assert_close(after, backbone_sq / 16, rtol=1e-4, atol=1e-8)


def test_joint_gradient_clipping(synthetic, tmp_path):  # noqa: F811
    run_ranks(_clipping, 2, tmp_path, synthetic, str(tmp_path))


def test_bf16_autocast_training_on_cpu(synthetic, tmp_path):  # noqa: F811
    cfg = make_config(synthetic, tmp_path / "bf16", train={"epochs": 2, "log_every": 1, "amp": "bf16",
                                                          "deterministic": False})
    res = train(cfg, 1, tmp_path, "bf16")
    losses = [h["loss"] for h in res["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


def test_fp16_needs_cuda(synthetic, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from gbcosface.distributed import DistContext
    from gbcosface.trainer import Trainer

    cfg = config_from_dict(make_config(synthetic, tmp_path / "fp16", train={"amp": "fp16"}))
    with pytest.raises(ValueError, match="fp16' with DDP needs a CUDA device"):
        Trainer(cfg, DistContext())


@pytest.mark.slow
def test_deepspeed_zero2_resume(synthetic, tmp_path):  # noqa: F811
    """DeepSpeed ZeRO-2 in bf16 saves its partitioned optimizer with the checkpoint and resumes
    from it; verification runs on the bf16 backbone."""
    require("deepspeed")
    cfg = make_config(synthetic, tmp_path / "ds2", train={"epochs": 1, "engine": "deepspeed", "deterministic": False,
                                                         "amp": "bf16"},
                      deepspeed={"zero_stage": 2}, eval={"bins": [synthetic["val"]]})
    first = train(cfg, 2, tmp_path, "ds2a")
    ckpt = tmp_path / "ds2" / "ckpt" / f"step-{first['step']:08d}"
    assert (ckpt / "deepspeed").is_dir()
    cfg["train"].update(resume="auto", epochs=2)
    second = train(cfg, 2, tmp_path, "ds2b")
    assert second["resumed_from"].endswith(ckpt.name)
    assert second["step"] == 2 * first["step"]
    assert 0.5 < second["after"]["synth_val"] <= 1.0
    assert torch.equal(second["params"][0], second["params"][1])


@pytest.mark.slow
def test_deepspeed_fp16_unscales_the_head(synthetic, tmp_path):  # noqa: F811
    """Under DeepSpeed fp16 the head's gradients arrive multiplied by the loss scale (2^8 here, so
    the first step does not overflow); the trainer divides them back, so the first step's head
    gradient norm matches the fp32 run's."""
    import json

    require("deepspeed")
    norms = {}
    for amp in ("none", "fp16"):
        ds_json = tmp_path / f"ds_{amp}.json"
        ds = {"zero_optimization": {"stage": 1}}
        if amp == "fp16":
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
        ds_json.write_text(json.dumps(ds))
        cfg = make_config(synthetic, tmp_path / amp, train={"epochs": 1, "engine": "deepspeed", "amp": amp,
                                                           "deterministic": False, "log_every": 1},
                          optim={"grad_clip": 0.0}, deepspeed={"config": str(ds_json)})
        res = train(cfg, 2, tmp_path, amp)
        norms[amp] = [h["grad_norm"] for h in res["history"]]
        losses = [h["loss"] for h in res["history"]]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert norms["fp16"][0] == pytest.approx(norms["none"][0], rel=0.05)
