#!/usr/bin/env bash
# Sample a video with the released STARFlow-V 7B model (official script's arguments and defaults).
#
#   scripts/sample_video.sh "a corgi running on the beach"                      # text-to-video
#   scripts/sample_video.sh "the robot swims away" photo.jpg                    # image-to-video
#   scripts/sample_video.sh "a corgi running on the beach" none 161             # 161 frames (longer than trained)
#   NPROC=8 scripts/sample_video.sh prompts.txt                                 # captions split across 8 GPUs
#
# Positional: CAPTION (text or a file with one caption per line), INPUT_IMAGE (a path, or "none"),
# TARGET_LENGTH (frames; default: the config's 81). Defaults: cfg 3.5, Jacobi threshold 0.001, block 32,
# aspect 16:9, and one video per caption and process (--sample_batch_size 1: a batch of 16 7B videos would need
# ~800 GiB of KV cache; `starflow sample --dry_run` prints the estimate). Extra flags after the positional ones go
# to `starflow sample` (e.g. --sample_batch_size 4 --num_samples 4).
set -euo pipefail
caption=${1:-}
[ $# -gt 0 ] && shift
input_image=none
target_length=
if [ $# -gt 0 ] && [[ $1 != -* ]]; then  # INPUT_IMAGE and TARGET_LENGTH are optional: flags may follow directly
  input_image=$1; shift
  if [ $# -gt 0 ] && [[ $1 != -* ]]; then
    target_length=$1; shift
  fi
fi
here=$(cd "$(dirname "$0")/.." && pwd)
ckpt=${CKPT:-$here/ckpts/starflow-v_7B_t2v_caus_480p_v3.pth}
cfg=$here/configs/starflow-v_7B_t2v_caus_480p.yaml
if [ ! -f "$ckpt" ] && [[ " $* " != *" --dry_run "* ]]; then  # (the dry run needs only the config)
  echo "error: $ckpt not found." >&2
  echo "  Get the STARFlow-V weights, T5 and WAN2.2 VAE with: starflow download t2v --local-dir $here/ckpts" >&2
  echo "  (offline, the same command lists the files to copy by hand; CKPT=path overrides the checkpoint)" >&2
  exit 2
fi
args=(--checkpoint_path "$ckpt" --model_config_path "$cfg" --cfg 3.5 --jacobi 1 --jacobi_th 0.001
      --jacobi_block_size 32 --aspect_ratio 16:9 --sample_batch_size 1 --output_dir "${OUTPUT_DIR:-outputs/video}")
if [ "$input_image" != "none" ] && [ -n "$input_image" ]; then
  args+=(--input_image "$input_image")
fi
if [ -n "$target_length" ]; then
  args+=(--target_length "$target_length")
fi
. "$here/scripts/_launch_sample.sh"
launch_sample "$caption" "${args[@]}" "$@"
