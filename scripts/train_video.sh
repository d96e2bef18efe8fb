#!/usr/bin/env bash
# Train a text-to-video STARFlow-V (with its learnable denoiser), on one process or many (torchrun).
#
#   scripts/train_video.sh CONFIG VIDEO_FOLDER [LOGDIR] [extra starflow-train flags...]
#
# VIDEO_FOLDER: video files plus metadata.jsonl ({"file_name", "text", optional "fps"} per line).
#
#   NPROC=8 scripts/train_video.sh configs/starflow-v_7B_t2v_caus_480p.yaml /data/videos runs/7b
#   scripts/train_video.sh configs/demo_moving_digits.yaml data/moving_digits/train runs/demo_moving_digits
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
config=$1; data=$2; logdir=${3:-runs/$(basename "${config%.*}")}
shift $(( $# >= 3 ? 3 : 2 ))
nproc=${NPROC:-1}
if [ "$nproc" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nproc_per_node "$nproc" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m starflow.cli train --config "$config" --data "$data" --logdir "$logdir" "$@"
fi
exec starflow train --config "$config" --data "$data" --logdir "$logdir" "$@"
