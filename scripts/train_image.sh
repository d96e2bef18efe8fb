#!/usr/bin/env bash
# Train a text-to-image STARFlow, on one process or many (torchrun).
#
#   scripts/train_image.sh CONFIG DATA_FOLDER [LOGDIR] [extra starflow-train flags...]  (LOGDIR: runs/CONFIG_NAME)
#
#   NPROC=8 scripts/train_image.sh configs/starflow_3B_t2i_256x256.yaml /data/images runs/3b
#   scripts/train_image.sh configs/demo_digits.yaml data/digits/train runs/demo_digits
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
config=$1; data=$2
shift 2
logdir=runs/$(basename "${config%.*}")
if [ $# -gt 0 ] && [[ $1 != -* ]]; then  # LOGDIR is optional: flags may follow DATA_FOLDER directly
  logdir=$1; shift
fi
nproc=${NPROC:-1}
if [ "$nproc" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nproc_per_node "$nproc" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m starflow.cli train --config "$config" --data "$data" --logdir "$logdir" "$@"
fi
exec starflow train --config "$config" --data "$data" --logdir "$logdir" "$@"
