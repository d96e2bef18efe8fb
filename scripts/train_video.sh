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
# `starflow train` reads video folders for video configs (vid_size set); the launch is the image script's.
exec bash "$(dirname "$0")/train_image.sh" "$@"
