"""Memory and time of loading a checkpoint into an FSDP2-sharded STARFlow (``starflow.distributed.load_sharded``,
what ``starflow sample`` does with ``fsdp: 1`` under torchrun), per rank, for each rank count of ``--ranks``.

A random model of the given width and layout is saved once as ``.safetensors`` (``--channels 1536``,
``--layers "2 2 8"``: 340M parameters, 1.36 GB); then for each rank count ``torchrun`` loads it onto the meta
device, shards it and fills the shards (``--dtype bf16`` converts while copying). Reported per rank: the peak
private (anonymous) memory above the process's start, sampled every 5 ms from ``/proc/self/status`` (the
file's memory-mapped pages are shared page cache and not counted), and the load time. CPU and gloo only.

    python benchmarks/sharded_load.py [--ranks 2,4] [--channels 1536] [--layers "2 2 8"] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _args import at_least, child_env

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time, torch, torch.distributed as dist
from starflow.config import load_config
from starflow.distributed import load_sharded
from starflow.models import STARFlow

peak = [0.0]
def anonymous_gib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 2**20
def watch():
    while True:
        peak[0] = max(peak[0], anonymous_gib())
        time.sleep(0.005)

dist.init_process_group("gloo")
with torch.device("meta"):
    model = STARFlow.from_config(load_config(sys.argv[1]), txt_dim=None, vae_downsample=1)
start = anonymous_gib()
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
load_sharded(model, sys.argv[2], torch.device("cpu"), getattr(torch, sys.argv[3]))
seconds = time.perf_counter() - t0
time.sleep(0.02)
print(json.dumps({"rank": dist.get_rank(), "extra_gib": max(peak[0], anonymous_gib()) - start, "seconds": seconds}),
      flush=True)
dist.destroy_process_group()
"""


def rank_counts(text: str) -> list[int]:
    """``--ranks``: comma-separated integers >= 1."""
    return [at_least(1)(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=rank_counts, default="2,4",
                        help="comma-separated rank counts, each >= 1 [default: 2,4]")
    parser.add_argument("--channels", type=at_least(64), default=1536,
                        help="transformer width, a multiple of the head width 64 [default: 1536]")
    parser.add_argument("--layers", default="2 2 8", help="layers per flow block")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    if args.channels % 64:
        parser.error(f"--channels {args.channels}: must be a multiple of the head width 64")
    sys.path.insert(0, str(ROOT))
    import yaml
    from safetensors.torch import save_file

    from starflow.config import load_config
    from starflow.models import STARFlow

    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(dict(
            img_size=8, channel_size=1, patch_size=1, channels=args.channels, layers_per_block=args.layers,
            head_dim=64, rope=1, sos=1, seq_order="L2R", use_softplus=1, cond_top_only=1, use_final_norm=1,
            txt_size=0, text="none", vae="none")))
        model = STARFlow.from_config(load_config(config), txt_dim=None, vae_downsample=1)
        count = sum(p.numel() for p in model.parameters())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(tmp) / "weights.safetensors"))
        del model
        (Path(tmp) / "child.py").write_text(CHILD)
        print(f"{count / 1e6:.1f}M parameters, {args.dtype} shards, CPU (gloo)")
        print(f"{'ranks':>5}  {'extra private GiB per rank (max)':>32}  {'load s (max over ranks)':>24}")
        env = child_env(OMP_NUM_THREADS="1")
        for n in args.ranks:
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                str(n), str(Path(tmp) / "child.py"), str(config), str(Path(tmp) / "weights.safetensors"),
                                dtype], env=env, capture_output=True, text=True, timeout=1200)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            print(f"{n:>5}  {max(x['extra_gib'] for x in rows):>32.2f}  {max(x['seconds'] for x in rows):>24.1f}")


if __name__ == "__main__":
    main()
