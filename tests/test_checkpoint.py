"""Checkpoints: atomic folders, crash leftovers ignored, keep-k, re-sharding, clear refusals."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gbcosface.checkpoint import (
    CheckpointError,
    HeadShard,
    capture_rng_state,
    check_compatible,
    find_latest,
    join_optimizer_rows,
    list_checkpoints,
    load_checkpoint,
    prune,
    reshard_rows,
    restore_rng_state,
    resume_path,
    save_checkpoint,
    split_optimizer_rows,
)
from gbcosface.config import config_from_dict
from gbcosface.distributed import DistContext
from tests.dist_utils import run_ranks

C, D = 10, 6  # 10 classes: uneven over 3 and 4 ranks


def make_config(num_classes: int = C, embedding_size: int = D):
    return config_from_dict({"data": {"backend": "synthetic", "num_classes": num_classes},
                             "backbone": {"name": "tiny", "embedding_size": embedding_size}})


def full_rows(seed: int, cols: int = D) -> torch.Tensor:
    return torch.randn(C, cols, generator=torch.Generator().manual_seed(seed))


def ranges(num_classes: int, world: int) -> list[tuple[int, int]]:
    """Written out independently of the code under test: the first C % W ranks get one extra row."""
    out, start = [], 0
    for r in range(world):
        n = num_classes // world + (1 if r < num_classes % world else 0)
        out.append((start, n))
        start += n
    return out


def shard_of(start: int, n: int) -> HeadShard:
    """Rows of two known full matrices: the weight and a per-row 'momentum'."""
    return HeadShard(start, n, full_rows(0)[start:start + n].clone(),
                     {"0/momentum_buffer": full_rows(1)[start:start + n].clone()},
                     {"param_groups": [{"lr": 0.1, "params": [0]}]})


def save_single(root: Path, step: int, keep: int = 0, **kw) -> Path:
    return save_checkpoint(root, ctx=DistContext(), step=step, epoch=step // 10, config=kw.pop("config", make_config()),
                           head=kw.pop("head", shard_of(0, C)), train_state={"boundary": torch.tensor([0.6])},
                           backbone={"w": torch.full((3,), float(step))}, keep=keep, **kw)


def test_round_trip_single_process(tmp_path):
    backbone_optim = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = save_single(tmp_path, 12000, backbone_optim=backbone_optim, rank_state={"sampler": torch.arange(4)})
    assert path == tmp_path / "step-00012000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00012000"]  # no temporary left
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["step"], manifest["epoch"], manifest["world_size"]) == (12000, 1200, 1)
    assert (manifest["num_classes"], manifest["embedding_size"]) == (C, D)
    assert manifest["config_hash"] == make_config().config_hash()
    assert manifest["shards"] == [{"rank": 0, "file": "head-rank00000.pt", "class_start": 0, "num_local": C}]
    assert manifest["complete"] is True
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "manifest.json"}
    assert manifest["files"] == on_disk
    assert {"backbone.pt", "optim-backbone.pt", "train_state.pt", "config.json", "head-rank00000.pt",
            "rank_state-rank00000.pt"} == set(on_disk)

    loaded = load_checkpoint(path, DistContext(), num_classes=C, embedding_size=D, class_start=0, num_local=C)
    torch.testing.assert_close(loaded.head.weight, full_rows(0), rtol=0, atol=0)
    torch.testing.assert_close(loaded.head.optimizer["0/momentum_buffer"], full_rows(1), rtol=0, atol=0)
    torch.testing.assert_close(loaded.backbone["w"], torch.full((3,), 12000.0))
    torch.testing.assert_close(loaded.backbone_optim["state"][0]["momentum_buffer"], torch.ones(3))
    assert loaded.train_state["step"] == 12000 and loaded.train_state["epoch"] == 1200
    torch.testing.assert_close(loaded.train_state["boundary"], torch.tensor([0.6]))
    torch.testing.assert_close(loaded.rank_state["sampler"], torch.arange(4))
    assert loaded.config == make_config().to_dict()


def test_rng_state_restores_every_generator():
    state = capture_rng_state(torch.device("cpu"))
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    restore_rng_state(state, torch.device("cpu"))
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1]
    torch.testing.assert_close(first[2], again[2], rtol=0, atol=0)


def test_saved_rng_state_continues_the_stream(tmp_path):
    torch.manual_seed(123)
    path = save_single(tmp_path, 1)
    expected = torch.rand(5)
    torch.manual_seed(999)
    loaded = load_checkpoint(path, DistContext(), num_classes=C, embedding_size=D, class_start=0, num_local=C)
    restore_rng_state(loaded.rank_state["rng"])
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_crash_leftovers_are_ignored(tmp_path):
    save_single(tmp_path, 10)
    good = save_single(tmp_path, 20)
    # killed while writing: a temporary folder with some shards and no manifest
    tmp = tmp_path / "step-00000030.tmp-deadbeef"
    shutil.copytree(good, tmp)
    (tmp / "manifest.json").unlink()
    # a final-named folder without a manifest
    no_manifest = tmp_path / "step-00000040"
    shutil.copytree(good, no_manifest)
    (no_manifest / "manifest.json").unlink()
    # a truncated shard: the manifest's recorded size no longer matches
    truncated = tmp_path / "step-00000050"
    shutil.copytree(good, truncated)
    shard = truncated / "head-rank00000.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    # a missing file
    missing = tmp_path / "step-00000060"
    shutil.copytree(good, missing)
    (missing / "backbone.pt").unlink()
    # a manifest not marked complete
    unmarked = tmp_path / "step-00000070"
    shutil.copytree(good, unmarked)
    manifest = json.loads((unmarked / "manifest.json").read_text())
    manifest["complete"] = False
    (unmarked / "manifest.json").write_text(json.dumps(manifest))

    assert find_latest(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]
    assert resume_path("auto", tmp_path) == good
    with pytest.raises(CheckpointError, match="head-rank00000.pt"):
        resume_path(str(truncated), tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(missing, DistContext(), num_classes=C, embedding_size=D, class_start=0, num_local=C)


def test_resume_path_modes(tmp_path):
    assert resume_path("auto", tmp_path / "none-yet") is None
    assert resume_path("", tmp_path) is None
    path = save_single(tmp_path / "ckpt", 5)
    assert resume_path(str(path), tmp_path) == path
    assert resume_path(str(tmp_path / "ckpt"), tmp_path) == path
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume_path(str(tmp_path / "empty"), tmp_path)


def test_keep_newest_k(tmp_path):
    (tmp_path / "step-00000002.tmp-0123abcd").mkdir(parents=True)
    (tmp_path / "step-00000099").mkdir()  # incomplete: never read, never deleted
    for step in range(1, 6):
        save_single(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005", "step-00000099"]
    assert prune(tmp_path, 1) == [tmp_path / "step-00000004"]


def test_same_step_saved_twice_is_replaced(tmp_path):
    save_single(tmp_path, 7)
    head = shard_of(0, C)
    head.weight.mul_(2)
    path = save_single(tmp_path, 7, head=head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007"]
    torch.testing.assert_close(reshard_rows(path, 0, C).weight, 2 * full_rows(0), rtol=0, atol=0)


def test_incompatible_checkpoint_names_file_and_values(tmp_path):
    path = save_single(tmp_path, 3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, DistContext(), num_classes=12, embedding_size=512, class_start=0, num_local=12)
    text = str(err.value)
    assert str(path / "manifest.json") in text
    assert "num_classes is 10 in the checkpoint but 12" in text
    assert "embedding_size is 6 in the checkpoint but 512" in text
    check_compatible(path, num_classes=C, embedding_size=D)


def test_resharding_one_to_two(tmp_path):
    path = save_single(tmp_path, 1)
    for rank, (start, n) in enumerate(ranges(C, 2)):
        got = reshard_rows(path, start, n)
        assert (got.class_start, got.num_local) == (start, n)
        torch.testing.assert_close(got.weight, full_rows(0)[start:start + n], rtol=0, atol=0)
        torch.testing.assert_close(got.optimizer["0/momentum_buffer"], full_rows(1)[start:start + n], rtol=0, atol=0)
        loaded = load_checkpoint(path, DistContext(rank=rank, world_size=2), num_classes=C, embedding_size=D,
                                 class_start=start, num_local=n)
        assert loaded.rank_state is None  # world size changed: no per-rank stream to continue


def test_optimizer_rows_round_trip_through_a_real_optimizer():
    weight = torch.nn.Parameter(full_rows(0))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = full_rows(2)
    opt.step()
    rows, rest = split_optimizer_rows(opt.state_dict(), C)
    assert set(rows) == {"0/momentum_buffer"}
    fresh = torch.optim.SGD([torch.nn.Parameter(full_rows(0))], lr=0.5, momentum=0.9)
    fresh.load_state_dict(join_optimizer_rows({k: v.clone() for k, v in rows.items()}, rest))
    torch.testing.assert_close(fresh.state_dict()["state"][0]["momentum_buffer"], full_rows(2), rtol=0, atol=0)
    assert fresh.param_groups[0]["lr"] == 0.1


def test_adam_step_count_is_not_a_row():
    weight = torch.nn.Parameter(full_rows(0))
    opt = torch.optim.AdamW([weight], lr=1e-3)
    weight.grad = full_rows(2)
    opt.step()
    rows, rest = split_optimizer_rows(opt.state_dict(), C)
    assert set(rows) == {"0/exp_avg", "0/exp_avg_sq"}
    assert set(rest["state"][0]) == {"step"}


def test_head_shard_refuses_wrong_row_counts():
    with pytest.raises(ValueError, match="rows"):
        HeadShard(0, 3, torch.zeros(4, D))


# ------------------------------------------------------------------------------ multi-rank


def _save_on_ranks(ctx: DistContext, root: str, out: str) -> None:
    """A save in which rank 1 fails (every rank must hear of it), then a good one."""
    start, n = ranges(C, ctx.world_size)[ctx.rank]
    width = D if ctx.rank != 1 else D + 1  # rows of the wrong width: rank 1's write fails
    try:
        save_checkpoint(root, ctx=ctx, step=5, epoch=0, config=make_config(),
                        head=HeadShard(start, n, torch.zeros(n, width)), train_state={})
    except CheckpointError as exc:
        Path(out, f"failed-rank{ctx.rank}.txt").write_text(str(exc))

    weight = torch.nn.Parameter(full_rows(0)[start:start + n].clone())
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = full_rows(2)[start:start + n].clone()
    opt.step()  # momentum buffer = the gradient rows after one step
    with torch.no_grad():
        weight.copy_(full_rows(0)[start:start + n])
    rows, rest = split_optimizer_rows(opt.state_dict(), n)
    head = HeadShard(start, n, weight.detach(), rows, rest)
    save_checkpoint(root, ctx=ctx, step=40, epoch=2, config=make_config(), head=head,
                    train_state={"boundary": torch.tensor([0.55])}, backbone={"w": torch.zeros(2)},
                    rank_state={"rank": torch.tensor(ctx.rank)}, keep=1)


def _spawn_save(tmp_path_factory, world: int) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp(f"ckpt{world}")
    run_ranks(_save_on_ranks, world, tmp, str(tmp / "ckpt"), str(tmp))
    return tmp / "ckpt" / "step-00000040", tmp


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, Path]:
    return _spawn_save(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four_rank_run(tmp_path_factory) -> tuple[Path, Path]:
    return _spawn_save(tmp_path_factory, 4)


def check_multi_rank_save(path: Path, out: Path, world: int) -> None:
    for rank in range(world):  # the failed save raised the same error on every rank ...
        assert "rank 1" in (out / f"failed-rank{rank}.txt").read_text()
    # ... and published nothing, while the good one left exactly one folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-00000040"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == world
    assert [(s["class_start"], s["num_local"]) for s in manifest["shards"]] == ranges(C, world)
    for rank in range(world):
        assert f"head-rank{rank:05d}.pt" in manifest["files"]
        assert f"rank_state-rank{rank:05d}.pt" in manifest["files"]
    start, n = ranges(C, world)[1]
    loaded = load_checkpoint(path, DistContext(rank=1, world_size=world), num_classes=C, embedding_size=D,
                             class_start=start, num_local=n)
    assert int(loaded.rank_state["rank"]) == 1


def check_reshard(path: Path, world: int) -> None:
    for start, n in ranges(C, world):
        got = reshard_rows(path, start, n)
        torch.testing.assert_close(got.weight, full_rows(0)[start:start + n], rtol=0, atol=0)
        torch.testing.assert_close(got.optimizer["0/momentum_buffer"], full_rows(2)[start:start + n], rtol=0, atol=0)
        opt = torch.optim.SGD([torch.nn.Parameter(got.weight.clone())], lr=0.3, momentum=0.9)
        opt.load_state_dict(join_optimizer_rows(got.optimizer, got.optimizer_rest))
        assert opt.param_groups[0]["lr"] == 0.1


def test_two_ranks_save_one_folder(two_rank_run):
    check_multi_rank_save(*two_rank_run, world=2)


@pytest.mark.parametrize("world", [3, 1])
def test_reshard_two_to(two_rank_run, world):
    check_reshard(two_rank_run[0], world)


@pytest.mark.slow
def test_four_ranks_save_one_folder(four_rank_run):
    check_multi_rank_save(*four_rank_run, world=4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 1])
def test_reshard_four_to(four_rank_run, world):
    check_reshard(four_rank_run[0], world)
