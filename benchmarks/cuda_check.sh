#!/usr/bin/env bash
# The CUDA paths in one pass, sized for a few minutes on one GPU.
#
#   bash benchmarks/cuda_check.sh [OUT]      # OUT: where the logs go [default: outputs/cuda_check]
#
# Run it from the repository root on a machine with a GPU and the packages of requirements.txt (the CUDA build
# of torch installed first). Every step runs under its own time limit, writes its whole output to
# OUT/<step>.log, and prints one line: exit code, seconds, and its last line; a failing step does not stop the
# others. Steps (set STEPS="fixtures sample" to run some of them):
#
#   env        GPU, torch and CUDA versions, bf16 support, TF32 defaults
#   fixtures   the official fixtures on the GPU in float32 (tests/test_fixtures.py, STARFLOW_TEST_DEVICE=cuda;
#              they are read from STARFLOW_REFERENCE_DIR or ../shared/reference, and the step fails if any skip)
#   sample     the shipped digits demo on the GPU: sequential and Jacobi, float32 and --bf16 weights (each against
#              sequential decoding on the CPU), and the moving-digits demo (text-to-video)
#   train      the digits demo for 200 steps: --precision auto (bf16 on CUDA), fp32, and --compile 1; then
#              FSDP2 over NCCL (torchrun, one process per GPU; on one GPU a one-rank group) for 20 steps
#   paths      device placement beyond the demo: tiny WAN2.2 and SD VAEs encode/decode, inpaint and edit,
#              cache-latents then training from the cache, eval-nll
#   step       benchmarks/train_step.py: the demo layout (fp32 and bf16; eager, compile, checkpoint) and the
#              3B layout at batch 4 (bf16, eager); then --profile 5 of the demo step (auto precision: bf16 on CUDA)
#   sampling   benchmarks/sampling.py: the shipped demo at batch 1, 8, 64 (fp32 and bf16), and the 3B layout
#              at batch 8 with random weights
#
# The tables of `step` and `sampling` are what the README's speed sections report for a GPU. DEVICE=cpu runs the
# same steps on the CPU (a check of this script; the CPU-against-GPU comparison then compares the CPU with itself;
# the 3B layout is left out there), and TRAIN_STEPS shortens the training runs.
set -u
OUT=${1:-outputs/cuda_check}
STEPS=${STEPS:-env fixtures sample train paths step sampling}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN_STEPS=${TRAIN_STEPS:-200}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
PROCS=$([ "$DEVICE" = cpu ] && echo 2 || echo "$GPUS")

check() {  # check NAME LIMIT_S COMMAND...: run one step, log it, print one line
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-28s rc %-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" \
        "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-110)"
}

starflow=($PY -m starflow.cli)  # an array, not a function: `timeout` runs programs only

wants() { [[ " $STEPS " == *" $1 "* ]]; }

if [ "$DEVICE" != cpu ] && [ "$GPUS" -lt 1 ]; then
    echo "no CUDA device visible to torch: nothing to check" >&2
    exit 2
fi

if wants env && [ "$DEVICE" != cpu ]; then
    check env 60 $PY -c "
import torch
p = torch.cuda.get_device_properties(0)
print(torch.__version__, 'CUDA', torch.version.cuda, '|', p.name, f'{p.total_memory / 2**30:.0f} GiB', '| GPUs', torch.cuda.device_count())
print('bf16', torch.cuda.is_bf16_supported(), '| TF32 matmul', torch.backends.cuda.matmul.allow_tf32,
      '| cudnn TF32', torch.backends.cudnn.allow_tf32, '| flash SDPA', torch.backends.cuda.flash_sdp_enabled())"
    cat "$OUT/env.log"
fi

if wants fixtures; then
    # a skipped fixture (reference files not found) fails the step rather than passing it
    check fixtures 300 env STARFLOW_TEST_DEVICE=$DEVICE PY=$PY bash -c \
        'out=$($PY -m pytest -q -rs -p no:cacheprovider tests/test_fixtures.py); rc=$?; echo "$out"
         [ $rc -eq 0 ] && ! grep -q skipped <<<"$out"'
fi

if wants sample; then
    common=(--caption "a handwritten digit 3" --caption "a handwritten digit 7" --num_samples 2)
    check sample_cpu 300 "${starflow[@]}" sample "${common[@]}" --device cpu --jacobi 0 --output_dir "$OUT/sample_cpu"
    check sample_cuda 300 "${starflow[@]}" sample "${common[@]}" --device $DEVICE --output_dir "$OUT/sample_cuda"
    check sample_cuda_seq 300 "${starflow[@]}" sample "${common[@]}" --device $DEVICE --jacobi 0 --output_dir "$OUT/sample_cuda_seq"
    check sample_cuda_bf16 300 "${starflow[@]}" sample "${common[@]}" --device $DEVICE --bf16 --output_dir "$OUT/sample_cuda_bf16"
    check sample_compare 60 $PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out = Path(sys.argv[1])
def load(name):
    files = sorted(p for p in (out / name).glob("*.png") if p.name != "grid.png")
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in files])
cpu = load("sample_cpu")
for name in ("sample_cuda", "sample_cuda_seq", "sample_cuda_bf16"):
    other = load(name)
    print(f"{name}: {len(other)} images, mean |cuda - cpu| {np.abs(other - cpu).mean():.3f} (0..255), "
          f"max {np.abs(other - cpu).max():.0f}")
EOF
    check sample_video 300 "${starflow[@]}" sample --checkpoint_path ckpts/demo_moving_digits --device $DEVICE --num_samples 1 \
        --caption "a handwritten digit 5 moving right" --gif --output_dir "$OUT/sample_video"
fi

if wants train; then
    rm -rf "$OUT"/run_auto "$OUT"/run_fp32 "$OUT"/run_compile "$OUT"/run_fsdp2  # fresh runs, not resumed ones
    [ -d data/digits/train ] || $PY scripts/prepare_digits.py --out data/digits >"$OUT/prepare_digits.log" 2>&1
    base=(train --config configs/demo_digits.yaml --data data/digits/train --device $DEVICE --steps "$TRAIN_STEPS"
          --log_freq 10 --save_freq "$TRAIN_STEPS" --sample_freq 0)
    check train_auto 300 "${starflow[@]}" "${base[@]}" --logdir "$OUT/run_auto"
    check train_fp32 300 "${starflow[@]}" "${base[@]}" --precision fp32 --logdir "$OUT/run_fp32"
    check train_compile 400 "${starflow[@]}" "${base[@]}" --compile 1 --logdir "$OUT/run_compile"
    check train_fsdp2_nccl 300 $PY -m torch.distributed.run --standalone --nproc_per_node "$PROCS" -m starflow.cli \
        train --config configs/demo_digits.yaml --data data/digits/train --steps 20 --log_freq 5 --save_freq 20 \
        --sample_freq 0 --fsdp 1 --logdir "$OUT/run_fsdp2"
    check train_losses 60 $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for run in ("run_auto", "run_fp32", "run_compile", "run_fsdp2"):
    path = Path(sys.argv[1]) / run / "metrics.jsonl"
    if not path.is_file():
        print(f"{run}: no metrics"); continue
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    speed = sorted(r["samples_per_s"] for r in rows)[len(rows) // 2]
    print(f"{run}: step {rows[-1]['step']}, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
          f"median {speed:.0f} samples/s")
EOF
fi

if wants paths; then  # the device-placement paths of the applications, the VAEs, the latent cache and eval-nll
    rm -rf "$OUT"/cache "$OUT"/run_cache
    [ -d data/digits/train ] || $PY scripts/prepare_digits.py --out data/digits >"$OUT/prepare_digits.log" 2>&1
    check vaes 120 $PY -c "
import torch
from starflow.adapters import build_tiny_wan_vae
from starflow.adapters.vae import build_tiny_sd_vae
for vae, x in ((build_tiny_wan_vae(device='$DEVICE'), torch.rand(1, 5, 3, 32, 32)),
               (build_tiny_sd_vae(device='$DEVICE'), torch.rand(1, 3, 16, 16))):
    z = vae.encode(x.to('$DEVICE') * 2 - 1, sample=False)
    print(type(vae).__name__, tuple(z.shape), z.device, tuple(vae.decode(z).shape))"
    check inpaint 120 "${starflow[@]}" inpaint --device $DEVICE --input_image docs/real_digit_4.png --mask_box 0,4,8,8 \
        --caption "a handwritten digit 9" --num_samples 2 --output_dir "$OUT/inpaint"
    check edit 120 "${starflow[@]}" edit --device $DEVICE --input_image docs/real_digit_3.png --caption_file docs/edits_3.txt \
        --output_dir "$OUT/edit"
    check cache_latents 120 "${starflow[@]}" cache-latents --config configs/demo_digits.yaml --data data/digits/train \
        --out "$OUT/cache" --device $DEVICE
    check train_from_cache 200 "${starflow[@]}" train --config configs/demo_digits.yaml --data "$OUT/cache" --no_flip 1 \
        --device $DEVICE --steps 20 --log_freq 5 --save_freq 20 --sample_freq 0 --logdir "$OUT/run_cache"
    check eval_nll 120 "${starflow[@]}" eval-nll --device $DEVICE --data data/digits/test --num_samples 256
fi

if wants step; then
    check step_demo 400 $PY benchmarks/train_step.py --device $DEVICE --precision fp32,bf16 --steps 10 --warmup 3
    [ "$DEVICE" = cpu ] || check step_3b 400 $PY benchmarks/train_step.py --device $DEVICE --layout configs/starflow_3B_t2i_256x256.yaml \
        --batch 4 --precision bf16 --modes eager --steps 5 --warmup 2
    # where a step's time goes (operators by device self time; their sum against the step's wall time above shows
    # whether the GPU or the host bounds it)
    check step_profile 200 $PY benchmarks/train_step.py --device $DEVICE --precision auto --profile 5
fi

if wants sampling; then
    check sampling_demo 400 $PY benchmarks/sampling.py --device $DEVICE --batch 1 8 64 --block_sizes 16 64 \
        --thresholds 1e-3 1e-4 --repeats 3
    [ "$DEVICE" = cpu ] || check sampling_3b 400 $PY benchmarks/sampling.py --device $DEVICE --layout configs/starflow_3B_t2i_256x256.yaml \
        --batch 8 --block_sizes 16 64 --thresholds 1e-3 --repeats 1
fi

for log in step_demo step_3b step_profile sampling_demo sampling_3b train_losses sample_compare; do
    [ -f "$OUT/$log.log" ] && { echo "== $log"; grep -v "^Loading\|it/s\]" "$OUT/$log.log" | tail -n 30; }
done
