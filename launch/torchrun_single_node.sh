#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU (or NPROC_PER_NODE processes on CPU).
#
#   launch/torchrun_single_node.sh --config configs/ms1mv2_r100_gbcosface.toml [section.key=value ...]
#   NPROC_PER_NODE=2 launch/torchrun_single_node.sh --config configs/demo_cpu.toml --dry-run
#
# Environment knobs (all optional):
#   NPROC_PER_NODE   processes on this machine (default: GPUs listed by nvidia-smi, else 1)
#   MAX_RESTARTS     times torchrun restarts the workers after a failure (default 0); resume
#                    with train.resume=auto picks up the newest complete checkpoint
#   MASTER_PORT      port of the local rendezvous store (default: a free port, torchrun's
#                    --standalone); set it to run several jobs side by side predictably
#   PYTHON           interpreter of the training environment (default: python3 on PATH)
#   TRAIN_SCRIPT     training entry point (default: train_dist.py at the repository root)
#   OMP_NUM_THREADS  CPU threads per process (torchrun sets 1 when unset and NPROC_PER_NODE > 1)
#   CUDA_VISIBLE_DEVICES, NCCL_DEBUG, ...  passed through untouched (see README.md)
set -euo pipefail

SCRIPT_NAME="launch/torchrun_single_node.sh"
USAGE="usage: $SCRIPT_NAME --config FILE [--max-restarts N] [--dry-run] [section.key=value ...]

Runs: \$PYTHON -m torch.distributed.run --nnodes=1 --nproc-per-node=\$NPROC_PER_NODE ...
      train_dist.py --config FILE [overrides]
Environment: NPROC_PER_NODE, MAX_RESTARTS, MASTER_PORT, PYTHON, TRAIN_SCRIPT (see the header
of this file and README.md)."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

torchrun_setup "$@"

cmd=("$PYTHON" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC_PER_NODE"
    --max-restarts="$MAX_RESTARTS")
if [[ -n "${MASTER_PORT:-}" ]]; then
    require_port MASTER_PORT "$MASTER_PORT"
    cmd+=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT" --rdzv-id=single-node)
else
    cmd+=(--standalone)
fi
cmd+=("$TRAIN_SCRIPT" --config "$CONFIG" "${OVERRIDES[@]}")

echo "[launch] single node: NPROC_PER_NODE=$NPROC_PER_NODE MAX_RESTARTS=$MAX_RESTARTS"
torchrun_env
run_command "${cmd[@]}"
