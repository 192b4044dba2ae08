"""The launch scripts for real, on CPU with gloo: two "nodes" on one machine, DeepSpeed's
launcher, and a rendezvous that never completes.

Each test starts the scripts as a user would (``bash launch/...``) in their own session, so a
test that fails or times out ends exactly the process groups it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.optional import require
from tests.test_launch import KNOBS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_cpu.toml"
IDENTITIES, PER_IDENTITY, BATCH = 8, 8, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, "-m", "gbcosface.data.synthetic", "--out", str(out), "--identities",
                    str(IDENTITIES), "--images-per-identity", str(PER_IDENTITY), "--val-identities", "4",
                    "--val-pairs", "20", "--workers", "1"], check=True, capture_output=True, timeout=120)
    return out


def tiny_overrides(synthetic: Path, output: Path, epochs: int = 1) -> list[str]:
    """The demo preset shrunk to a few steps: 64 images, 8 per rank and step."""
    return [
        f"data.rec={synthetic / 'train.rec'}", f"data.idx={synthetic / 'train.idx'}",
        f"data.num_classes={IDENTITIES}", f"data.num_images={IDENTITIES * PER_IDENTITY}",
        f"data.batch_size={BATCH}", "data.num_workers=0",
        f"eval.bins=[\"{synthetic / 'synth_val.bin'}\"]", "eval.batch_size=20",
        f"train.epochs={epochs}", f"train.output={output}", "train.log_every=1", "train.timeout_s=120",
        "checkpoint.every=0", "checkpoint.keep=1",
    ]


def start(script: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[int]:
    """Wait for every process; on timeout end the process groups these tests started."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"launch did not finish within {timeout} s\n" + tails(logs))
    return codes


def tails(logs: list[Path], lines: int = 40) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]) for log in logs)


def check_single_checkpoint(output: Path, overrides: list[str], world_size: int, steps: int) -> dict:
    from gbcosface.checkpoint import checkpoint_problem, list_checkpoints, read_manifest, reshard_rows
    from gbcosface.config import load_config

    root = output / "ckpt"
    entries = sorted(p.name for p in root.iterdir())
    assert entries == [f"step-{steps:08d}"], f"expected one checkpoint folder and nothing else, got {entries}"
    (ckpt,) = list_checkpoints(root)
    assert checkpoint_problem(ckpt) is None
    manifest = read_manifest(ckpt)
    assert manifest["world_size"] == world_size and manifest["step"] == steps
    assert manifest["num_classes"] == IDENTITIES
    # The run's configuration, and a head whose shards tile every class exactly once.
    assert manifest["config_hash"] == load_config(REPO / CONFIG, overrides).config_hash()
    starts = [(s["class_start"], s["num_local"]) for s in manifest["shards"]]
    assert [s for s, _ in starts] == [sum(n for _, n in starts[:i]) for i in range(len(starts))]
    full = reshard_rows(ckpt, 0, IDENTITIES)
    assert tuple(full.weight.shape) == (IDENTITIES, 128)
    assert (output / "model.pt").is_file()
    return manifest


def test_two_nodes_on_one_machine_train_and_write_one_checkpoint(synthetic, tmp_path):
    output = tmp_path / "run"
    overrides = tiny_overrides(synthetic, output)
    env = launch_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NPROC_PER_NODE="1",
                     RDZV_TIMEOUT="120")
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [start("torchrun_multi_node.sh", ["--config", CONFIG, *overrides], {**env, "NODE_RANK": str(r)}, log)
             for r, log in zip((0, 1), logs)]
    assert finish(procs, logs, timeout=420) == [0, 0], tails(logs)
    text = logs[0].read_text()
    assert "[launch] command: " in text and "--node-rank=0" in text and "--nnodes=2" in text
    steps = IDENTITIES * PER_IDENTITY // (BATCH * 2)
    check_single_checkpoint(output, overrides, world_size=2, steps=steps)

    # A second launch (as after a preemption or requeue) resumes from it with train.resume=auto
    # and runs the next epoch; keep=1 leaves only the newest checkpoint.
    more = tiny_overrides(synthetic, output, epochs=2)
    env["MASTER_PORT"] = str(free_port())
    logs = [tmp_path / f"resume{r}.log" for r in (0, 1)]
    procs = [start("torchrun_multi_node.sh", ["--config", CONFIG, *more], {**env, "NODE_RANK": str(r)}, log)
             for r, log in zip((0, 1), logs)]
    assert finish(procs, logs, timeout=420) == [0, 0], tails(logs)
    check_single_checkpoint(output, more, world_size=2, steps=2 * steps)


def test_deepspeed_launcher_two_processes_on_cpu(synthetic, tmp_path):
    require("deepspeed")
    output = tmp_path / "ds"
    overrides = tiny_overrides(synthetic, output) + ["deepspeed.zero_stage=1"]
    env = launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    log = tmp_path / "deepspeed.log"
    proc = start("deepspeed.sh", ["--config", CONFIG, *overrides], env, log)
    # The first DeepSpeed run on a machine JIT-builds a CPU comm op (~40 s, then cached).
    assert finish([proc], [log], timeout=540) == [0], tails([log])
    text = log.read_text()
    assert "-m deepspeed.launcher.runner --num_gpus 2" in text and "train.engine=deepspeed" in text
    check_single_checkpoint(output, ["train.engine=deepspeed", *overrides], world_size=2,
                            steps=IDENTITIES * PER_IDENTITY // (BATCH * 2))


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_rendezvous_that_never_completes_fails_within_the_timeout(rendezvous, tmp_path):
    port = str(free_port())
    timeout = 6
    env = launch_env(NNODES="2", NPROC_PER_NODE="1", RDZV_TIMEOUT=str(timeout))
    if rendezvous == "static":
        env.update(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    else:
        env.update(RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="lonely")
    log = tmp_path / "node0.log"
    began = time.monotonic()
    proc = start("torchrun_multi_node.sh", ["--config", CONFIG, "train.output=" + str(tmp_path / "never")], env, log)
    (code,) = finish([proc], [log], timeout=timeout + 90)
    elapsed = time.monotonic() - began
    text = log.read_text()
    assert code != 0, text
    assert elapsed < timeout + 60, f"took {elapsed:.0f} s for a {timeout} s rendezvous timeout"
    assert "rendezvous did not complete" in text and "NNODES=2" in text and f"RDZV_TIMEOUT={timeout}" in text, text
    assert not (tmp_path / "never").exists(), "no worker may start without a complete rendezvous"


def test_sigterm_to_the_launch_script_checkpoints_and_stops(synthetic, tmp_path):
    """Preemption: SIGTERM to the script (as SLURM sends it) reaches torchrun and the workers,
    which agree to stop, write a complete checkpoint at the next step and exit."""
    output = tmp_path / "preempted"
    overrides = tiny_overrides(synthetic, output, epochs=500)  # far more steps than the test waits for
    env = launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    log = tmp_path / "preempted.log"
    proc = start("torchrun_single_node.sh", ["--config", CONFIG, *overrides], env, log)
    deadline = time.monotonic() + 180
    while "step 3/" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            finish([proc], [log], timeout=1)
            pytest.fail("training never reached step 3\n" + tails([log]))
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    finish([proc], [log], timeout=120)
    text = log.read_text()
    assert "stop requested" in text and "stopped by a signal" in text, tails([log])
    from gbcosface.checkpoint import list_checkpoints, read_manifest

    (ckpt,) = list_checkpoints(output / "ckpt")
    manifest = read_manifest(ckpt)
    total = 500 * IDENTITIES * PER_IDENTITY // (BATCH * 2)
    assert 3 <= manifest["step"] < total and manifest["world_size"] == 2
    assert not (output / "model.pt").exists(), "an interrupted run exports no final model"
