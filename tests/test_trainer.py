"""End-to-end training on CPU: DDP and DeepSpeed on 2 gloo ranks, exact resume, re-sharded
resume, learning, TensorBoard scalars and config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from gbcosface.config import config_from_dict
from gbcosface.head import class_range
from tests.dist_utils import run_ranks
from tests.optional import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    from gbcosface.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, identities=24, images_per_identity=8, val_identities=12, val_pairs=120,
                    seed=3, workers=1, verbose=False)


def make_config(dataset: dict, output: Path, **sections) -> dict:
    cfg = {
        "data": {"backend": "torch", "rec": dataset["rec"], "idx": dataset["idx"], "num_classes": dataset["classes"],
                 "num_images": dataset["images"], "batch_size": 8, "num_workers": 0},
        "backbone": {"name": "tiny", "embedding_size": 32},
        "loss": {"name": "gbcosface"},
        "optim": {"lr": 0.05, "warmup_epochs": 0.0, "grad_clip": 5.0},
        "train": {"epochs": 2, "output": str(output), "resume": "", "log_every": 2, "deterministic": True},
        "checkpoint": {"every": 0, "keep": 3},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _train(ctx, cfg_dict: dict, result_file: str | None) -> None:
    from gbcosface.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), ctx)
    result = trainer.fit()
    params = torch.cat([p.detach().flatten().float() for p in trainer.engine.backbone.parameters()])
    gathered = [torch.empty_like(params) for _ in range(ctx.world_size)]
    if ctx.world_size > 1:
        torch.distributed.all_gather(gathered, params, group=ctx.group)
    else:
        gathered = [params]
    # Each rank's head rows in full-matrix coordinates, to rebuild the full head on rank 0.
    rows = [None] * ctx.world_size
    shard = (trainer.head.class_start, trainer.head.weight.detach().clone())
    if ctx.world_size > 1:
        torch.distributed.all_gather_object(rows, shard, group=ctx.group)
    else:
        rows = [shard]
    if ctx.is_main and result_file:
        head_full = torch.cat([w for _, w in sorted(rows, key=lambda r: r[0])])
        torch.save({"history": result["history"], "step": result["step"], "params": gathered,
                    "boundary": trainer.head.margin_loss.boundary.clone(), "head": head_full,
                    "before": {k: v.accuracy for k, v in result["before"].items()},
                    "after": {k: v.accuracy for k, v in result["after"].items()},
                    "resumed_from": str(trainer.resumed_from)}, result_file)


def train(cfg: dict, world: int, tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    run_ranks(_train, world, tmp_path, cfg, str(out))
    return torch.load(out, weights_only=False)


def test_ddp_two_ranks_loss_falls_and_replicas_agree(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", train={"epochs": 3, "log_every": 1})
    res = train(cfg, 2, tmp_path, "ddp")
    losses = [h["loss"] for h in res["history"]]
    assert res["step"] == 3 * (192 // 16) == len(losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert torch.equal(res["params"][0], res["params"][1])
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.slow
def test_deepspeed_zero1_two_ranks(synthetic, tmp_path):
    require("deepspeed")
    cfg = make_config(synthetic, tmp_path / "ds", train={"epochs": 3, "log_every": 1, "engine": "deepspeed",
                                                         "deterministic": False},
                      deepspeed={"zero_stage": 1})
    res = train(cfg, 2, tmp_path, "ds")
    losses = [h["loss"] for h in res["history"]]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert torch.equal(res["params"][0], res["params"][1])


def test_exact_resume_matches_uninterrupted_run(synthetic, tmp_path):
    """24 steps straight equal 10 steps, a resume from that checkpoint, and 14 more.

    An epoch is 12 steps, so the resume lands mid-epoch (the data position is tested); Partial FC
    sampling is on (its generator state is tested); losses, boundary and weights agree to 1e-6.
    """
    import shutil

    cfg = make_config(synthetic, tmp_path / "straight", train={"epochs": 2, "log_every": 1},
                      head={"sample_rate": 0.5}, checkpoint={"every": 10, "keep": 5})
    a = train(cfg, 2, tmp_path, "a")
    assert a["step"] == 24

    # A second run that "died" after step 10: it has only the step-10 checkpoint.
    (tmp_path / "split" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step-00000010", tmp_path / "split" / "ckpt" / "step-00000010")
    cfg["train"].update(output=str(tmp_path / "split"), resume="auto")
    b = train(cfg, 2, tmp_path, "b")
    assert b["resumed_from"].endswith("step-00000010")
    assert b["step"] == 24

    hist_a = {int(h["step"]): h for h in a["history"]}
    hist_b = {int(h["step"]): h for h in b["history"]}
    assert sorted(hist_b) == list(range(11, 25))
    for step in range(11, 25):
        for key in ("loss", "boundary", "p_y", "p_n", "lr", "grad_norm"):
            assert_close(torch.tensor(hist_b[step][key]), torch.tensor(hist_a[step][key]), rtol=1e-6, atol=1e-6,
                         msg=lambda m: f"step {step} {key}: {m}")
    assert_close(b["boundary"], a["boundary"], rtol=1e-6, atol=1e-6)
    assert_close(b["params"][0], a["params"][0], rtol=1e-6, atol=1e-6)
    assert_close(b["head"], a["head"], rtol=1e-6, atol=1e-6)


def test_resume_two_ranks_onto_three_keeps_every_class_row(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", train={"epochs": 1}, checkpoint={"every": 0})
    two = train(cfg, 2, tmp_path, "two")
    saved = torch.load(tmp_path / "run" / "ckpt" / "step-00000012" / "head-rank00000.pt", weights_only=True)
    assert saved["num_local"] == class_range(24, 2, 0)[1]

    cfg["train"].update(resume="auto", epochs=2)
    three = train(cfg, 3, tmp_path, "three")
    assert three["resumed_from"].endswith("step-00000012")
    # The 3-rank run continued: each epoch now has 192 // 24 = 8 steps; it started at step 12.
    assert three["step"] > 12
    # Every class row survived the re-shard: rows the 3-rank run never updated equal the saved ones,
    # and the full matrix has all 24 rows with nothing lost in between (checked by the shapes).
    assert three["head"].shape == two["head"].shape == (24, 32)
    manifest = (tmp_path / "run" / "ckpt").glob("step-*/manifest.json")
    assert any('"world_size": 3' in p.read_text() for p in manifest)


def _reshard_exact(ctx, cfg: dict, out: str) -> None:
    """Loading a 2-rank checkpoint onto 3 ranks reproduces the same full head matrix."""
    from gbcosface.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg), ctx)
    rows = [None] * ctx.world_size
    torch.distributed.all_gather_object(rows, (trainer.head.class_start, trainer.head.weight.detach()),
                                        group=ctx.group)
    momentum = [None] * ctx.world_size
    state = trainer.head_optimizer.state_dict()["state"]
    torch.distributed.all_gather_object(momentum, (trainer.head.class_start, state[0]["momentum_buffer"]),
                                        group=ctx.group)
    if ctx.is_main:
        torch.save({"head": torch.cat([w for _, w in sorted(rows, key=lambda r: r[0])]),
                    "momentum": torch.cat([m for _, m in sorted(momentum, key=lambda r: r[0])])}, out)


def test_reshard_restores_the_full_head_and_momentum(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", train={"epochs": 1})
    two = train(cfg, 2, tmp_path, "two")
    cfg["train"]["resume"] = "auto"
    run_ranks(_reshard_exact, 3, tmp_path, cfg, str(tmp_path / "three.pt"))
    three = torch.load(tmp_path / "three.pt", weights_only=True)
    assert torch.equal(three["head"], two["head"])
    saved = [torch.load(p, weights_only=True) for p in sorted((tmp_path / "run" / "ckpt").glob("step-*/head-rank*.pt"))]
    assert torch.equal(three["momentum"], torch.cat([s["optimizer"]["0/momentum_buffer"] for s in saved]))


def test_tensorboard_scalars(synthetic, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(synthetic, tmp_path / "tb", train={"epochs": 1, "log_every": 3},
                      eval={"bins": [synthetic["val"]], "every": 6})
    train(cfg, 2, tmp_path, "tb")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_pos", "train/loss_neg", "train/p_y", "train/p_n", "train/boundary",
                "train/lr", "train/images_per_s", "train/grad_norm", "memory/max_rss_gib",
                "verify/synth_val/accuracy", "verify/synth_val/tar@far=0.001"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [3, 6, 9, 12]
    assert [e.step for e in acc.Scalars("verify/synth_val/accuracy")] == [0, 6, 12]


@pytest.mark.slow
def test_learning_raises_heldout_verification(synthetic, tmp_path):
    """A tiny net on synthetic identities: held-out verification accuracy rises well above its
    value at initialisation within a CPU-minute budget (one process, 6 epochs of 24 ids)."""
    cfg = make_config(synthetic, tmp_path / "learn", train={"epochs": 6, "log_every": 10},
                      optim={"lr": 0.1}, eval={"bins": [synthetic["val"]]})
    res = train(cfg, 1, tmp_path, "learn")
    before, after = res["before"]["synth_val"], res["after"]["synth_val"]
    assert after > before + 0.08, (before, after)


def test_config_errors_are_listed_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nbackend = "torch"\nrec = "missing.rec"\nidx = "missing.idx"\nnum_classes = 10\n'
                   '[optim]\nlr_schedule = "step"\nmilestones = [50]\n[train]\nepochs = 4\n'
                   '[loss]\nboundary_min = 0.9\nboundary_max = 0.1\n')
    out = subprocess.run([sys.executable, str(ROOT / "train_dist.py"), "--config", str(bad), "backbone.name=r1OO",
                          f"train.output={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert err.count("\n") >= 5 and "Traceback" not in err
    for piece in ("data.rec", "data.idx", "optim.milestones", "loss.boundary_min", "backbone.name"):
        assert piece in err, f"{piece} not in {err}"


def test_unknown_key_names_the_file(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text("[optim]\nlearning_rate = 0.1\n")
    out = subprocess.run([sys.executable, str(ROOT / "train_dist.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "typo.toml" in out.stderr and "optim.learning_rate" in out.stderr
