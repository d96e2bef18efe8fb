# Shared by sample_image.sh and sample_video.sh (sourced): launch_sample CAPTION ARGS... [-- EXTRA...]
# CAPTION is a caption or a file with one caption per line; NPROC > 1 splits the captions across processes.
launch_sample() {
  local caption=$1; shift
  local args=("$@")
  if [ -n "$caption" ] && [ -f "$caption" ]; then
    args+=(--caption_file "$caption")
  elif [ -n "$caption" ]; then
    args+=(--caption "$caption")
  fi
  if [ "${NPROC:-1}" -gt 1 ]; then
    exec torchrun --nproc_per_node "$NPROC" -m starflow.cli sample "${args[@]}"
  fi
  exec starflow sample "${args[@]}"
}
