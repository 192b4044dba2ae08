# Shared by the launch scripts (sourced, not run): argument parsing, checks, printing and
# running the final command. Each script sets SCRIPT_NAME and USAGE before sourcing this file.
#
# Arguments every script accepts:
#   --config FILE        the TOML preset passed to train_dist.py (required)
#   --dry-run            print the command and exit 0 without running it
#   -h, --help           print the script's usage and exit 0
#   section.key=value    overrides, passed through to train_dist.py in order
#   --                   everything after it is an override, even if it starts with "--"

# shellcheck shell=bash

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="${REPO_DIR:-$(cd "$LAUNCH_DIR/.." && pwd)}"

CONFIG=""
DRY_RUN=0
OVERRIDES=()

die() {
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 2
}

usage() {
    printf '%s\n' "$USAGE"
}

# Parse the common arguments. A script with flags of its own defines `extra_flag NAME VALUE`,
# which returns 0 when it consumed the pair and 1 when NAME is not its flag.
parse_args() {
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1 ;;
            --config)
                (($# >= 2)) || die "--config needs a FILE argument"
                CONFIG="$2"; shift ;;
            --config=*) CONFIG="${1#--config=}" ;;
            --) shift; OVERRIDES+=("$@"); break ;;
            --*=*)
                if declare -F extra_flag >/dev/null && extra_flag "${1%%=*}" "${1#*=}"; then :
                else die "unknown option ${1%%=*} (see --help)"; fi ;;
            --*)
                if declare -F extra_flag >/dev/null && (($# >= 2)) && extra_flag "$1" "$2"; then shift
                else die "unknown option $1 (see --help)"; fi ;;
            *) OVERRIDES+=("$1") ;;
        esac
        shift
    done
    [[ -n "$CONFIG" ]] || die "--config FILE is required (a preset from configs/, e.g. configs/demo_cpu.toml)"
    [[ -f "$CONFIG" ]] || die "config file not found: $CONFIG (--config; relative paths are read from $(pwd))"
    [[ -r "$CONFIG" ]] || die "config file is not readable: $CONFIG (--config)"
    local item
    for item in "${OVERRIDES[@]}"; do
        [[ "$item" =~ ^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*= ]] \
            || die "override '$item' is not section.key=value (e.g. optim.lr=0.05)"
    done
}

# require_int NAME VALUE MIN [MAX]: a clear error naming the variable when VALUE is not an
# integer in [MIN, MAX].
require_int() {
    local name="$1" value="$2" min="$3" max="${4:-}"
    [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be an integer, got '$value'"
    ((10#$value >= min)) || die "$name must be >= $min, got $value"
    if [[ -n "$max" ]]; then
        ((10#$value <= max)) || die "$name must be <= $max, got $value"
    fi
}

require_port() {
    require_int "$1" "$2" 1 65535
}

# The Python interpreter that runs the launcher (torch.distributed.run / deepspeed).
find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable"
        return
    fi
    PYTHON="$(command -v python3 || command -v python || true)"
    [[ -n "$PYTHON" ]] || die "no python3 on PATH; set PYTHON to the interpreter of the training environment"
}

# The training entry point; TRAIN_SCRIPT overrides it (tests, forks).
find_train_script() {
    TRAIN_SCRIPT="${TRAIN_SCRIPT:-$REPO_DIR/train_dist.py}"
    [[ -f "$TRAIN_SCRIPT" ]] || die "training entry point not found: $TRAIN_SCRIPT (set TRAIN_SCRIPT or REPO_DIR)"
}

# Processes per node: NPROC_PER_NODE, else the number of GPUs nvidia-smi lists, else 1.
default_nproc() {
    if [[ -z "${NPROC_PER_NODE:-}" ]]; then
        local gpus=0
        if command -v nvidia-smi >/dev/null 2>&1; then
            gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
        fi
        NPROC_PER_NODE=$((gpus > 0 ? gpus : 1))
    fi
    require_int NPROC_PER_NODE "$NPROC_PER_NODE" 1
}

# torchrun's c10d rendezvous (also behind --standalone) shares its TCP store with the workers;
# after a --max-restarts restart a worker can then read the previous attempt's gloo/NCCL
# addresses and fail with "connectFullMesh ... Connection refused" (pytorch/pytorch#135712,
# docs/RELIABILITY.md). A separate store per attempt avoids it; set the variable to 0 to opt out.
torchrun_env() {
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
}

# Print the environment variables that change how the job communicates, when set.
print_env() {
    local name
    for name in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG NCCL_DEBUG_SUBSYS \
        TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT \
        GLOO_SOCKET_IFNAME OMP_NUM_THREADS CUDA_VISIBLE_DEVICES TORCH_EXTENSIONS_DIR \
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT TORCH_DISABLE_SHARE_RDZV_TCP_STORE; do
        if [[ -n "${!name:-}" ]]; then
            echo "[launch] env: $name=${!name}"
        fi
    done
}

# Quote one word for a POSIX shell, leaving plain words as they are (like Python's shlex.quote).
shell_quote() {
    if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\"\'\"\'}"
    fi
}

# Print the command, shell-quoted, on one line starting with "[launch] command: ".
print_command() {
    local line="" word
    for word in "$@"; do
        line+="${line:+ }$(shell_quote "$word")"
    done
    echo "[launch] command: $line"
}

# Run the command as a child, forwarding SIGTERM/SIGINT (SLURM preemption, Ctrl-C) so the
# trainer can checkpoint, and explain a failure with `failure_hint ELAPSED_S STATUS` when the
# script defines it. With --dry-run only print.
run_command() {
    print_env
    print_command "$@"
    if ((DRY_RUN)); then
        exit 0
    fi
    local start=$SECONDS child status=0
    "$@" &
    child=$!
    # A background child of a non-interactive shell ignores SIGINT, so Ctrl-C is sent on as
    # SIGTERM, which torchrun and the deepspeed launcher pass on to their workers.
    FORWARDED=0
    trap 'FORWARDED=1; kill -TERM "$child" 2>/dev/null' TERM INT
    # `wait` returns early when a trapped signal arrives; wait again while the child lives.
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do
        status=0
        wait "$child" || status=$?
    done
    trap - TERM INT
    if ((FORWARDED)); then
        echo "$SCRIPT_NAME: stopped by a signal (sent on to the launcher as SIGTERM); exit status $status" >&2
    elif ((status != 0)); then
        echo "$SCRIPT_NAME: the launcher exited with status $status after $((SECONDS - start)) s" >&2
        if declare -F failure_hint >/dev/null; then
            failure_hint "$((SECONDS - start))" "$status" >&2
        fi
    fi
    exit "$status"
}

# The torchrun scripts' shared start: their one extra flag (--max-restarts N, or MAX_RESTARTS),
# the common arguments, the interpreter, the training script and the processes per node.
torchrun_setup() {
    extra_flag() {
        case "$1" in
            --max-restarts) MAX_RESTARTS="$2" ;;
            *) return 1 ;;
        esac
    }
    parse_args "$@"
    find_python
    find_train_script
    default_nproc
    MAX_RESTARTS="${MAX_RESTARTS:-0}"
    require_int MAX_RESTARTS "$MAX_RESTARTS" 0
}
