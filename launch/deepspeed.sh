#!/usr/bin/env bash
# Train with DeepSpeed's launcher (ZeRO 0-2 on the backbone; the sharded head stays outside).
# It adds train.engine=deepspeed (and deepspeed.config=$DS_CONFIG when set) before your overrides.
#
# One node:
#   NPROC_PER_NODE=8 DS_CONFIG=launch/ds_zero1_bf16.json \
#       launch/deepspeed.sh --config configs/ms1mv2_r100_gbcosface.toml train.amp=bf16
# Several nodes (run once, on the first host; the launcher reaches the others over ssh/pdsh):
#   HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 DS_CONFIG=launch/ds_zero2_bf16.json \
#       launch/deepspeed.sh --config configs/glint360k_r50_gbcosface.toml train.amp=bf16
#
# Environment knobs:
#   HOSTFILE        MPI-style hostfile ("host slots=N" lines, see launch/hostfile.example);
#                   unset = this machine only
#   NUM_NODES       use the first NUM_NODES hosts of HOSTFILE (default: all)
#   NPROC_PER_NODE  processes per node, DeepSpeed's --num_gpus (default: GPUs listed by
#                   nvidia-smi, else 1; on CPU DeepSpeed runs that many gloo processes)
#   MASTER_ADDR     address of the first host (default: DeepSpeed infers it)
#   MASTER_PORT     rendezvous port (default 29500)
#   DS_CONFIG       DeepSpeed JSON (launch/ds_zero1_bf16.json, launch/ds_zero2_bf16.json);
#                   unset = built from the preset's [deepspeed] zero_stage and train.amp.
#                   A bf16 JSON needs train.amp=bf16: the trainer refuses a mismatch
#   DS_LAUNCHER     multi-node backend: pdsh (default), openmpi, mvapich, slurm, ...
#   PYTHON, TRAIN_SCRIPT   interpreter and entry point (defaults: python3, train_dist.py)
#   TORCH_EXTENSIONS_DIR   where DeepSpeed caches JIT-built ops (CPU: a comm op, ~40 s once)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG ...  exported to every rank (see README.md;
#                   for pdsh hosts also list them in a .deepspeed_env file)
set -euo pipefail

SCRIPT_NAME="launch/deepspeed.sh"
USAGE="usage: $SCRIPT_NAME --config FILE [--dry-run] [section.key=value ...]

Runs: \$PYTHON -m deepspeed.launcher.runner [--hostfile \$HOSTFILE] --num_gpus \$NPROC_PER_NODE
      --master_port \$MASTER_PORT train_dist.py --config FILE train.engine=deepspeed
      [deepspeed.config=\$DS_CONFIG] [overrides]
Environment: HOSTFILE, NUM_NODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, DS_CONFIG,
DS_LAUNCHER, PYTHON, TRAIN_SCRIPT. See the header of this file and README.md."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
find_python
find_train_script
default_nproc
MASTER_PORT="${MASTER_PORT:-29500}"
require_port MASTER_PORT "$MASTER_PORT"

cmd=("$PYTHON" -m deepspeed.launcher.runner)
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE not found: $HOSTFILE (an MPI-style file of 'host slots=N' lines)"
    grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
        || die "HOSTFILE $HOSTFILE lists no 'host slots=N' line (see launch/hostfile.example)"
    cmd+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
fi
if [[ -n "${NUM_NODES:-}" ]]; then
    [[ -n "${HOSTFILE:-}" ]] || die "NUM_NODES is set but HOSTFILE is not: NUM_NODES picks hosts from the hostfile"
    require_int NUM_NODES "$NUM_NODES" 1
    cmd+=(--num_nodes "$NUM_NODES")
fi
cmd+=(--num_gpus "$NPROC_PER_NODE")
if [[ -n "${MASTER_ADDR:-}" ]]; then
    cmd+=(--master_addr "$MASTER_ADDR")
fi
cmd+=(--master_port "$MASTER_PORT" "$TRAIN_SCRIPT" --config "$CONFIG" train.engine=deepspeed)
if [[ -n "${DS_CONFIG:-}" ]]; then
    [[ -f "$DS_CONFIG" ]] || die "DS_CONFIG not found: $DS_CONFIG (e.g. launch/ds_zero1_bf16.json)"
    cmd+=("deepspeed.config=$DS_CONFIG")
fi
cmd+=("${OVERRIDES[@]}")

echo "[launch] deepspeed: HOSTFILE=${HOSTFILE:-none (this machine)} NPROC_PER_NODE=$NPROC_PER_NODE MASTER_PORT=$MASTER_PORT DS_CONFIG=${DS_CONFIG:-from the preset}"
run_command "${cmd[@]}"
