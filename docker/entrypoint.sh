#!/usr/bin/env bash
# Container entrypoint. Arguments that start with "-" (or none) launch training through the
# script LAUNCHER names; anything else runs as a command (tensorboard, python -m ..., bash).
#
#   docker run ... gbcosface --config configs/ms1mv2_r100_gbcosface.toml train.amp=bf16
#   docker run -e LAUNCHER=multi -e NNODES=2 -e NODE_RANK=0 -e MASTER_ADDR=... gbcosface --config ...
#   docker run ... gbcosface python -m gbcosface.data.pack shuffle data/x/train.rec data/x/shuf
#
# LAUNCHER: single (default, launch/torchrun_single_node.sh), multi
# (launch/torchrun_multi_node.sh) or deepspeed (launch/deepspeed.sh); each reads its own
# environment knobs (NPROC_PER_NODE, NNODES, ...), documented at the top of the script.
set -euo pipefail

if (($# == 0)); then
    set -- --help
fi
if [[ "$1" != -* ]]; then
    exec "$@"
fi
case "${LAUNCHER:-single}" in
    single) script=launch/torchrun_single_node.sh ;;
    multi) script=launch/torchrun_multi_node.sh ;;
    deepspeed) script=launch/deepspeed.sh ;;
    *) echo "entrypoint: error: LAUNCHER must be single, multi or deepspeed, got '$LAUNCHER'" >&2; exit 2 ;;
esac
exec bash "${APP_DIR:-/workspace/gbcosface}/$script" "$@"
