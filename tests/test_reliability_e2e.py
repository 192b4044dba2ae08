"""Reliability end to end: ``train_dist.py`` processes killed, stopped, preempted or left alone.

Ranks are started the way SLURM's ``srun`` starts tasks (one process per rank, launcher variables
set, loopback only) or under ``torchrun --max-restarts=1``. Faults are delivered from outside
with signals to processes this test started (never by name), at points read off the checkpoint
folder, so the trainer carries no test hook. docs/RELIABILITY.md maps every fault to its test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from gbcosface import checkpoint as ckpt
from tests.test_reliability import make_config, synthetic, trainer_for, write_toml  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
START_S = 120  # generous bound for interpreter + torch start-up on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``world`` train_dist.py processes with the launcher variables srun/torchrun would set."""

    def __init__(self, tmp_path: Path, cfg: dict, world: int = 2, ranks: list[int] | None = None,
                 name: str = "job") -> None:
        toml = write_toml(cfg, tmp_path / f"{name}.toml")
        port = free_port()
        self.logs = [(tmp_path / f"{name}-{r}.out", tmp_path / f"{name}-{r}.err") for r in range(world)]
        self.procs: dict[int, subprocess.Popen] = {}
        for rank in (range(world) if ranks is None else ranks):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
            out, err = self.logs[rank]
            self.procs[rank] = subprocess.Popen([sys.executable, "train_dist.py", "--config", str(toml)], cwd=ROOT,
                                                env=env, stdout=open(out, "w"), stderr=open(err, "w"))

    def signal(self, rank: int, sig: int) -> None:
        if self.procs[rank].poll() is None:
            os.kill(self.procs[rank].pid, sig)

    def wait(self, rank: int, timeout: float) -> int:
        return self.procs[rank].wait(timeout=timeout)

    def stderr(self, rank: int) -> str:
        return self.logs[rank][1].read_text()

    def stdout(self, rank: int) -> str:
        return self.logs[rank][0].read_text()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_checkpoint(root: Path, step: int, alive, timeout: float = 300) -> Path:
    """Poll until a complete checkpoint of at least ``step`` is published."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = ckpt.find_latest(root)
        if latest is not None and int(latest.name.split("-")[1]) >= step:
            return latest
        assert alive(), "the job ended before the checkpoint appeared"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def long_run(dataset: dict, output: Path, **train) -> dict:
    """Long enough (600 steps on 2 ranks) that the fault always lands mid-training."""
    return make_config(dataset, output, train={"epochs": 50, "log_every": 5, **train},
                       checkpoint={"every": 5, "keep": 3})


# ------------------------------------------------------------------------------ SIGKILL + torchrun


def torchrun(tmp_path: Path, cfg: dict, name: str) -> subprocess.Popen:
    toml = write_toml(cfg, tmp_path / f"{name}.toml")
    # torchrun shares its rendezvous store with the workers by default, and a restarted worker can
    # then read the previous attempt's gloo addresses ("connectFullMesh failed ... Connection
    # refused"; pytorch/pytorch#135712). A store per attempt avoids it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                             "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.5", "train_dist.py",
                             "--config", str(toml)], cwd=ROOT, env=env,
                            stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)


def final_state(folder: Path) -> dict:
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return {"backbone": load("backbone.pt"), "head": [load(ckpt.head_file(r))["weight"] for r in (0, 1)],
            "boundary": load("train_state.pt")["loss_state"]["boundary"], "step": load("train_state.pt")["step"]}


@pytest.mark.slow
def test_sigkill_under_torchrun_restarts_and_matches_an_uninterrupted_run(synthetic, tmp_path):
    # 120 steps (a few seconds), so the kill after step 8 always lands mid-training.
    cfg = make_config(synthetic, tmp_path / "straight", train={"epochs": 10, "log_every": 4, "deterministic": True,
                                                                 "resume": "auto"},
                      checkpoint={"every": 4, "keep": 3})
    straight = torchrun(tmp_path, cfg, "straight")
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.out").read_text()[-3000:]

    cfg["train"]["output"] = str(tmp_path / "killed")
    job = torchrun(tmp_path, cfg, "killed")
    try:
        wait_for_checkpoint(tmp_path / "killed" / "ckpt", 8, lambda: job.poll() is None)
        workers = [p for p in psutil.Process(job.pid).children() if "train_dist.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        os.kill(victim.pid, signal.SIGKILL)
        assert job.wait(timeout=600) == 0
    finally:
        if job.poll() is None:
            for child in psutil.Process(job.pid).children(recursive=True):
                os.kill(child.pid, signal.SIGKILL)
            os.kill(job.pid, signal.SIGKILL)
            job.wait()
    log = (tmp_path / "killed.out").read_text()
    assert "resumed from" in log, log[-3000:]
    resumed_at = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 8 <= resumed_at < 120

    a = final_state(tmp_path / "straight" / "ckpt" / "step-00000120")
    b = final_state(tmp_path / "killed" / "ckpt" / "step-00000120")
    assert a["step"] == b["step"] == 120
    assert torch.equal(a["boundary"], b["boundary"])
    for name, tensor in a["backbone"].items():
        assert torch.equal(tensor, b["backbone"][name]), name
    for wa, wb in zip(a["head"], b["head"]):
        assert torch.equal(wa, wb)


# ------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_on_every_rank_saves_once_and_exits_zero(synthetic, tmp_path):
    """Like SLURM preemption: every task gets SIGTERM; all stop at one step, save, exit 0."""
    out = tmp_path / "run"
    job = Ranks(tmp_path, long_run(synthetic, out))
    try:
        wait_for_checkpoint(out / "ckpt", 5, lambda: all(p.poll() is None for p in job.procs.values()))
        for rank in (0, 1):
            job.signal(rank, signal.SIGTERM)
        codes = [job.wait(rank, START_S) for rank in (0, 1)]
    finally:
        job.close()
    assert codes == [0, 0], job.stderr(0)[-2000:] + job.stderr(1)[-2000:]
    latest = ckpt.find_latest(out / "ckpt")
    step = int(latest.name.split("-")[1])
    assert 5 <= step < 600 and ckpt.checkpoint_problem(latest) is None
    assert f"stopped on request at step {step} with a complete checkpoint" in job.stdout(0)
    assert not [p for p in (out / "ckpt").iterdir() if ".tmp-" in p.name]
    assert not (out / "model.pt").exists()  # stopped, not finished: no export

    cfg = long_run(synthetic, out, resume="auto")
    trainer = trainer_for(cfg)  # resumable (onto one rank: the head rows are re-sharded)
    assert trainer.resumed_from == latest and trainer.step == step


@pytest.mark.slow
def test_sigterm_to_torchrun_is_forwarded_and_every_worker_saves(synthetic, tmp_path):
    """torchrun forwards SIGTERM to its workers (and SIGKILLs them 30 s later): they save within
    the grace period and exit 0, though torchrun itself reports the signal with a non-zero code."""
    out = tmp_path / "run"
    job = torchrun(tmp_path, long_run(synthetic, out), "term")
    try:
        wait_for_checkpoint(out / "ckpt", 5, lambda: job.poll() is None)
        os.kill(job.pid, signal.SIGTERM)
        job.wait(timeout=START_S)
    finally:
        if job.poll() is None:
            for child in psutil.Process(job.pid).children(recursive=True):
                os.kill(child.pid, signal.SIGKILL)
            os.kill(job.pid, signal.SIGKILL)
            job.wait()
    log = (tmp_path / "term.out").read_text()
    latest = ckpt.find_latest(out / "ckpt")
    step = int(latest.name.split("-")[1])
    assert f"stopped on request at step {step} with a complete checkpoint" in log, log[-3000:]
    assert "got signal: 15" in log  # torchrun's own report; the workers exited cleanly
    assert ckpt.checkpoint_problem(latest) is None and 5 <= step < 600


@pytest.mark.slow
def test_sigterm_with_a_stuck_peer_exits_within_the_grace_period(synthetic, tmp_path):
    out = tmp_path / "run"
    job = Ranks(tmp_path, long_run(synthetic, out, preempt_grace_s=3.0, timeout_s=300.0))
    try:
        before = wait_for_checkpoint(out / "ckpt", 5, lambda: all(p.poll() is None for p in job.procs.values()))
        job.signal(1, signal.SIGSTOP)  # rank 1 freezes: rank 0 cannot reach the step boundary
        job.signal(0, signal.SIGTERM)
        code = job.wait(0, 60)  # liveness bound, far below train.timeout_s = 300
    finally:
        job.close()
    assert code == 5
    err = job.stderr(0)
    assert "no checkpoint within train.preempt_grace_s = 3 s" in err and "newest complete one stands" in err
    latest = ckpt.find_latest(out / "ckpt")
    assert latest is not None and int(latest.name.split("-")[1]) >= int(before.name.split("-")[1])
    assert ckpt.checkpoint_problem(latest) is None


# ------------------------------------------------------------------------------ no hang


def test_a_rank_that_never_joins_ends_the_job_with_a_clear_error(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", train={"timeout_s": 3.0})
    started = time.monotonic()
    job = Ranks(tmp_path, cfg, world=2, ranks=[0])  # rank 1 is never started
    try:
        code = job.wait(0, 3 * 3.0 + START_S)
    finally:
        job.close()
    assert code == 4
    err = job.stderr(0)
    assert "the process group did not form within train.timeout_s = 3 s" in err
    assert "1/2 clients joined" in err and "every rank of the job was started" in err
    assert time.monotonic() - started < 3 * 3.0 + START_S


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_within_the_timeout(synthetic, tmp_path):
    out = tmp_path / "run"
    job = Ranks(tmp_path, long_run(synthetic, out, timeout_s=5.0))
    try:
        wait_for_checkpoint(out / "ckpt", 5, lambda: all(p.poll() is None for p in job.procs.values()))
        job.signal(1, signal.SIGSTOP)
        code = job.wait(0, 3 * 5.0 + 60)
    finally:
        job.close()
    assert code == 4
    err = job.stderr(0)
    assert "a collective did not complete within train.timeout_s = 5 s" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_preflight_failure_ends_every_rank_with_one_message(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", checkpoint={"min_free_gb": 1e9}, data={"num_classes": 20})
    job = Ranks(tmp_path, cfg)
    try:
        codes = [job.wait(rank, START_S) for rank in (0, 1)]
    finally:
        job.close()
    assert codes == [2, 2]
    err = job.stderr(0)
    assert "problems found before training started" in err and "Traceback" not in err
    assert "data.num_classes" in err and "lists 24 identities" in err
    assert "error" not in job.stderr(1)
    assert not (tmp_path / "run" / "tensorboard").exists()
