"""DistContext from the launchers' environments, and the demo under a real torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from gbcosface.distributed import DistContext, default_backend, init_distributed, launcher_env

TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_no_launcher_means_single_process():
    assert launcher_env({}) == {}
    ctx = init_distributed(device="cpu", environ={})
    assert ctx == DistContext(0, 1, 0, torch.device("cpu"), None, None)
    assert ctx.is_main and not ctx.is_distributed
    ctx.barrier()  # a no-op without a group


def test_torchrun_environment():
    assert launcher_env(TORCHRUN_ENV) == {"rank": 3, "world_size": 8, "local_rank": 1}


def test_deepspeed_local_rank_argument():
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_RANK"}
    assert launcher_env(env, local_rank_arg=5)["local_rank"] == 5
    assert launcher_env(env)["local_rank"] == 3  # falls back to the global rank on one node


def test_world_size_one_launcher_needs_no_group():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    ctx = init_distributed(device="cpu", environ=env)
    assert ctx.group is None and ctx.world_size == 1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT missing"),
        ({**TORCHRUN_ENV, "RANK": "x"}, "non-integer"),
        ({**TORCHRUN_ENV, "RANK": "8"}, r"RANK=8 is outside \[0, WORLD_SIZE=8\)"),
    ],
)
def test_bad_environment_messages(env, message):
    with pytest.raises(RuntimeError, match=message):
        launcher_env(env)


def test_backend_follows_the_device():
    assert default_backend("cuda") == "nccl" and default_backend("cpu") == "gloo"


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        init_distributed(device="cuda", environ={})


@pytest.mark.slow
def test_demo_under_torchrun_two_ranks():
    """`make demo`'s command: 2 gloo ranks via torchrun, the loss falls, the boundary moves."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gbcosface.demo_loss", "--steps", "20"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GB-CosFace on 2 rank(s) (gloo)" in out.stdout
    first, last, boundary = map(float, re.search(r"loss (\S+) -> (\S+); boundary (\S+);", out.stdout).groups())
    assert last < first and 0.0 < boundary < 1.0
