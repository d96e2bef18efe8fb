"""Training throughput and peak memory of ``starflow train``: 1 and N processes, with and without activation
checkpointing, from images or from cached latents.

A small text-to-image config (64x64 RGB real digits through a tiny 4x AutoencoderKL, a tiny T5, a
~1M-parameter flow) is trained for ``--steps`` steps per variant with ``starflow train`` (under
``torchrun --nproc_per_node N`` for N > 1, FSDP2). samples/s is measured between the ``--warmup``-th and the
last step (global batch / wall time per step); memory is rank 0's peak (CUDA: allocated; CPU: the resident set of
the whole process, start-up, T5 and VAE included). Latent caching encodes VAE latents and T5 embeddings once (``starflow cache-latents``); its one-off
time is printed too. On CPU the processes share the cores: every variant uses ``--threads`` in total.

    python benchmarks/train_throughput.py [--steps 30] [--nproc 2] [--device cpu|cuda] [--precision auto|fp32|bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _args import at_least

CONFIG = dict(img_size=64, channel_size=4, patch_size=1, channels=96, layers_per_block="2 2 4", head_dim=32,
              rope=1, sos=1, seq_order="L2R", use_softplus=1, cond_top_only=1, use_final_norm=1, soft_clip=4.0,
              txt_size=32, noise_std=0.1, drop_label=0.1, lr=1e-4, min_lr=1e-6, warmup_steps=0, batch_size=32,
              grad_clip=1.0, num_workers=0, log_freq=1, sample_freq=0, seed=0, fsdp=1,
              no_flip=1)  # no flip augmentation: a latent cache holds the unflipped latents


def prepare(root: Path) -> dict[str, Path]:
    """Digits at 64x64 RGB, their shards, a tiny T5 and a tiny 4x AutoencoderKL saved as folders."""
    from starflow.adapters import build_tiny_text_encoder
    from starflow.adapters.vae import build_tiny_sd_vae
    from starflow.data import pack_folder, write_digits

    write_digits(root / "digits", size=CONFIG["img_size"])
    build_tiny_text_encoder(CONFIG["txt_size"]).save_pretrained(root / "t5")
    build_tiny_sd_vae(block_out_channels=(16, 32, 32)).save_pretrained(root / "vae")
    pack_folder(root / "digits" / "train", root / "shards", shard_size=128)
    return {"images": root / "shards"}


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def throughput(logdir: Path, warmup: int) -> tuple[float, float]:
    """samples/s between step ``warmup`` and the last step, and the peak memory in GiB (rank 0)."""
    m = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    a, b = m[warmup - 1], m[-1]
    batch = CONFIG["batch_size"]
    return (b["step"] - a["step"]) * batch / (b["elapsed_s"] - a["elapsed_s"]), b["peak_mem_gib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=at_least(2), default=30, help="training steps per variant [default: 30]")
    parser.add_argument("--warmup", type=at_least(1), default=5,
                        help="steps excluded from the timing, fewer than --steps [default: 5]")
    parser.add_argument("--nproc", type=at_least(1), default=2, help="processes of the multi-process variants [default: 2]")
    parser.add_argument("--threads", type=at_least(1), default=os.cpu_count(), help="CPU threads in total per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [default: cpu]")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the training config key (auto: bf16 on CUDA, fp32 on CPU) [default: auto]")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup}: must be below --steps {args.steps} (the timing starts after it)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        config = dict(CONFIG, text=str(root / "t5"), vae=str(root / "vae"), steps=args.steps, save_freq=10**6)
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, TMPDIR=tmp, HF_HUB_OFFLINE="1")
        t = run([sys.executable, "-m", "starflow.cli", "cache-latents", "--config", str(root / "config.yaml"),
                 "--data", str(data["images"]), "--out", str(root / "cache"), "--device", args.device],
                dict(env, OMP_NUM_THREADS=str(args.threads)))
        data["cached latents"] = root / "cache"
        total = json.loads((root / "cache" / "index.json").read_text())["total"]
        print(f"latent cache: {total} images encoded once in {t:.1f} s (VAE + T5), including start-up")
        rows = []
        for nproc in sorted({1, args.nproc}):
            for ckpt in (0, 1):
                for name, folder in data.items():
                    logdir = root / f"run_{nproc}_{ckpt}_{name.replace(' ', '_')}"
                    launch = [sys.executable] if nproc == 1 else \
                        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                    cmd = [*launch, "-m", "starflow.cli", "train", "--config", str(root / "config.yaml"),
                           "--data", str(folder), "--logdir", str(logdir), "--device", args.device,
                           "--precision", args.precision,
                           "--gradient_checkpoint", str(ckpt), "--gradient_checkpoint_mlp", str(ckpt)]
                    run(cmd, dict(env, OMP_NUM_THREADS=str(max(1, args.threads // nproc))))
                    rows.append((nproc, "attn+mlp" if ckpt else "off", name, *throughput(logdir, args.warmup)))
    print(f"\nstarflow train, {args.device}, precision {args.precision}, global batch {CONFIG['batch_size']}, "
          f"{args.steps} steps "
          f"(timed after step {args.warmup}), FSDP2 when processes > 1")
    print(f"{'processes':>9}  {'act. ckpt':<9}  {'data':<15}  {'samples/s':>9}  {'peak GiB, rank 0':>16}")
    for nproc, ckpt, name, sps, mem in rows:
        print(f"{nproc:>9}  {ckpt:<9}  {name:<15}  {sps:>9.1f}  {mem:>16.3f}")


if __name__ == "__main__":
    main()
