#!/usr/bin/env bash
# Train on several machines with torchrun: run this script once on every node.
#
# Static rendezvous (fixed node ranks; node 0 hosts the store at MASTER_ADDR:MASTER_PORT):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       launch/torchrun_multi_node.sh --config configs/ms1mv2_r100_gbcosface.toml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       launch/torchrun_multi_node.sh --config configs/ms1mv2_r100_gbcosface.toml
#
# c10d rendezvous (elastic: node ranks are assigned as nodes join, restarts re-rendezvous):
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29500 RDZV_ID=job42 \
#       launch/torchrun_multi_node.sh --config configs/ms1mv2_r100_gbcosface.toml --max-restarts 3
#
# Environment knobs:
#   NNODES           number of nodes (required)
#   NODE_RANK        this node's rank in [0, NNODES) (required for the static rendezvous;
#                    falls back to SLURM_NODEID under SLURM; with RDZV_ENDPOINT, torchrun
#                    assigns node ranks in join order and NODE_RANK is only checked)
#   MASTER_ADDR, MASTER_PORT   address and port of node 0 (static rendezvous)
#   RDZV_ENDPOINT    host:port of a c10d rendezvous; when set, MASTER_ADDR/PORT are not used
#   RDZV_ID          job id shared by all nodes of one run (c10d; default gbcosface)
#   RDZV_TIMEOUT     seconds to wait for all NNODES nodes to join before failing (default 900)
#   MAX_RESTARTS     worker-group restarts after a failure (default 0; also --max-restarts N)
#   NPROC_PER_NODE   processes per node (default: GPUs listed by nvidia-smi, else 1)
#   PYTHON, TRAIN_SCRIPT   interpreter and entry point (defaults: python3, train_dist.py)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, GLOO_SOCKET_IFNAME ...  passed through; see
#                    README.md for the ones multi-node jobs usually need
set -euo pipefail

SCRIPT_NAME="launch/torchrun_multi_node.sh"
USAGE="usage: $SCRIPT_NAME --config FILE [--max-restarts N] [--dry-run] [section.key=value ...]

Run it on every node with the same NNODES and rendezvous settings:
  static: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
  c10d:   NNODES, RDZV_ENDPOINT=host:port, RDZV_ID (node ranks assigned in join order)
Other environment: RDZV_TIMEOUT (s, default 900), MAX_RESTARTS, NPROC_PER_NODE, PYTHON,
TRAIN_SCRIPT. See the header of this file and README.md."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

torchrun_setup "$@"

[[ -n "${NNODES:-}" ]] || die "NNODES is not set: export the number of nodes (the same value on every node)"
require_int NNODES "$NNODES" 1
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
require_int RDZV_TIMEOUT "$RDZV_TIMEOUT" 1
if [[ -n "$NODE_RANK" ]]; then
    require_int NODE_RANK "$NODE_RANK" 0 "$((NNODES - 1))"
fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
    --max-restarts="$MAX_RESTARTS")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    [[ "$RDZV_ENDPOINT" =~ ^[^:[:space:]]+:([0-9]+)$ ]] \
        || die "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
    require_port "port of RDZV_ENDPOINT" "${BASH_REMATCH[1]}"
    RDZV_ID="${RDZV_ID:-gbcosface}"
    RENDEZVOUS="c10d at $RDZV_ENDPOINT (id $RDZV_ID)"
    cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID"
        --rdzv-conf="join_timeout=$RDZV_TIMEOUT")
else
    [[ -n "${MASTER_ADDR:-}" ]] \
        || die "set MASTER_ADDR and MASTER_PORT (static rendezvous) or RDZV_ENDPOINT=host:port (c10d)"
    [[ -n "${MASTER_PORT:-}" ]] || die "MASTER_PORT is not set (the port node 0 listens on, e.g. 29500)"
    require_port MASTER_PORT "$MASTER_PORT"
    [[ -n "$NODE_RANK" ]] || die "NODE_RANK is not set: 0 on the node at MASTER_ADDR, 1..$((NNODES - 1)) on the others"
    RENDEZVOUS="static at $MASTER_ADDR:$MASTER_PORT"
    cmd+=(--rdzv-backend=static --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
        --node-rank="$NODE_RANK" --rdzv-conf="timeout=$RDZV_TIMEOUT")
fi
cmd+=("$TRAIN_SCRIPT" --config "$CONFIG" "${OVERRIDES[@]}")

failure_hint() {
    local elapsed="$1"
    # A rendezvous failure happens before any worker starts, so within the timeout plus a
    # little; later failures come from training itself (the traceback above names the rank).
    if ((elapsed <= RDZV_TIMEOUT + 30)); then
        cat <<EOF
$SCRIPT_NAME: if the log above ends in RendezvousTimeoutError or "waiting for clients", the
  rendezvous did not complete: not all NNODES=$NNODES nodes joined the $RENDEZVOUS within
  RDZV_TIMEOUT=${RDZV_TIMEOUT} s. Start the script on every node with the same NNODES and
  rendezvous settings, check that the rendezvous host and port are reachable from this node
  (firewall, the right address), and see "Troubleshooting" in README.md.
EOF
    else
        echo "$SCRIPT_NAME: training failed on node NODE_RANK=${NODE_RANK:-?}; the first failing rank's traceback is above."
    fi
}

[[ -n "${RDZV_ENDPOINT:-}" ]] && NODE_RANK_SHOWN="assigned by rendezvous" || NODE_RANK_SHOWN="$NODE_RANK"
echo "[launch] multi node: NNODES=$NNODES NODE_RANK=$NODE_RANK_SHOWN NPROC_PER_NODE=$NPROC_PER_NODE rendezvous=$RENDEZVOUS timeout=${RDZV_TIMEOUT}s MAX_RESTARTS=$MAX_RESTARTS"
torchrun_env
run_command "${cmd[@]}"
