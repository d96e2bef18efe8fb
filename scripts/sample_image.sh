#!/usr/bin/env bash
# Sample images from a caption (or a caption file) with the released 3B text-to-image model (official
# script's defaults: cfg 3.6, Jacobi block 16, threshold 1e-3). Without its checkpoint the script stops and says
# how to get it; the small demo model that ships in ckpts/ is sampled with `starflow sample` alone.
#
#   scripts/sample_image.sh "a red fox in the snow"
#   scripts/sample_image.sh prompts.txt                 # one caption per line
#   NPROC=4 scripts/sample_image.sh prompts.txt         # split the captions across 4 processes
#
# Extra flags after the caption go to `starflow sample` (e.g. --cfg 3.6 --seed 1 --output_dir out/).
# CKPT=path picks another checkpoint in the official layout (default: ckpts/starflow_3B_t2i_256x256.pth).
set -euo pipefail
caption=${1:-}
shift $(( $# > 0 ? 1 : 0 ))
here=$(cd "$(dirname "$0")/.." && pwd)
official_ckpt=${CKPT:-$here/ckpts/starflow_3B_t2i_256x256.pth}
official_cfg=$here/configs/starflow_3B_t2i_256x256.yaml
if [ ! -f "$official_ckpt" ] && [[ " $* " != *" --dry_run "* ]]; then  # (the dry run needs only the config)
  echo "error: $official_ckpt not found." >&2
  echo "  Get the STARFlow 3B weights, T5 and SD-VAE with: starflow download t2i --local-dir $here/ckpts" >&2
  echo "  (offline, the same command lists the files to copy by hand; CKPT=path overrides the checkpoint;" >&2
  echo "  the shipped demo model needs no script: starflow sample --caption \"a handwritten digit 3\")" >&2
  exit 2
fi
args=(--checkpoint_path "$official_ckpt" --model_config_path "$official_cfg" --cfg 3.6 --jacobi 1 --jacobi_th 0.001
      --jacobi_block_size 16)
. "$here/scripts/_launch_sample.sh"
launch_sample "$caption" "${args[@]}" "$@"
