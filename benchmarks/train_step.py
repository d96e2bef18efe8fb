"""One training step of a STARFlow layout: time, peak memory and achieved FLOP/s; eager, torch.compile and
activation checkpointing side by side.

A step is the forward pass and the loss (``STARFlow.loss``: every flow block, the log-determinants) and the
backward pass, on random latents and text embeddings, as ``starflow train`` runs it (the optimizer update is
left out: it is the same for every variant). Each variant runs in its own process, so its peak memory is its
own (CUDA: ``max_memory_allocated`` of the timed steps; CPU: the process's peak resident set, which includes the
interpreter, ~0.3 GiB, the model build and what warm-up and compilation left resident: compare it across CPU variants
only roughly, and never with the CUDA figure).

Default layout: the shipped digits demo (``configs/demo_digits.yaml``: 4 flow blocks of 2 2 2 4 layers, head
width 32, a 24-token text prefix) scaled to 256 tokens (``img_size 16``) and width 192, batch 8.
``--layout configs/starflow_3B_t2i_256x256.yaml`` times a released layout (at a small ``--batch``).

``--precision`` is the training config key: ``fp32``, or ``bf16`` = float32 parameters under bf16 autocast,
as ``starflow train`` runs it (the official recipe; attention runs in float32 on a CPU, see
:func:`starflow.models.layers.causal_self_attention_in_chunks` and :func:`starflow.models.layers.attend`); the default
``auto`` is bf16 on CUDA and fp32 on CPU.

FLOPs are counted analytically (:func:`step_flops`) and checked against ``torch.utils.flop_counter``.

    python benchmarks/train_step.py [--layout CONFIG] [--batch 8] [--steps 10] [--device cpu|cuda]
                                    [--precision auto|fp32|bf16|fp32,bf16] [--rounds 1] [--profile N]

``--profile N`` instead runs ``N`` eager steps (of one ``--precision``) under ``torch.profiler`` after the
warm-up and prints where a step's time goes: the operators by self time, per step.

With ``--rounds R`` every variant (mode x precision) runs R times, in interleaved rounds, each in a fresh process.

``faults/step`` counts the minor page faults of the process per timed step (fresh memory the kernel maps and
zeroes). On a CPU each process keeps freed memory as ``starflow train`` does (config key ``malloc_retain``,
:mod:`starflow.train.memory`); ``--malloc_retain 0`` measures glibc's defaults instead.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _args import at_least, child_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starflow.adapters.geometry import vae_geometry  # noqa: E402
from starflow.config import PRECISIONS, load_config  # noqa: E402
from starflow.models import STARFlow  # noqa: E402
from starflow.models.layers import causal_chunk_edges  # noqa: E402
from starflow.models.starflow import patchify  # noqa: E402
from starflow.models.tarflow_block import FlowBlock  # noqa: E402
from starflow.sizing import latent_shape, text_width  # noqa: E402
from starflow.train.memory import retain_freed_memory  # noqa: E402
from starflow.train.parallelize import training_dtype  # noqa: E402
from starflow.train.trainer import peak_memory_gib  # noqa: E402

MODES = ("eager", "compile", "checkpoint")
DEMO_SCALED = {"img_size": 16, "channels": 192}  # the demo layout at 256 tokens, width 192


def build(args: argparse.Namespace):
    """The model (train mode) and one batch ``(x, y)`` of the layout."""
    overrides = dict(DEMO_SCALED) if args.layout is None else {}
    if args.img_size:
        overrides["img_size"] = args.img_size
    cfg = load_config(args.layout or ROOT / "configs" / "demo_digits.yaml", overrides)
    txt_dim = text_width(cfg, Path(args.layout).parent if args.layout else ROOT / "configs")
    down = vae_geometry(cfg.vae).downsample  # the latent the flow sees: no VAE, SD-VAE or WAN2.2
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=down)
    model.train()
    x = torch.randn(args.batch, *latent_shape(cfg), device=device)
    y = torch.randn(args.batch, cfg.txt_size, txt_dim, device=device) if txt_dim else None
    return cfg, model, x, y


def step_flops(model: STARFlow, x: torch.Tensor, y: torch.Tensor | None, attention: str = "square") -> int:
    """Analytic FLOPs of one training step (forward + backward = 3 x forward).

    Per flow block with ``N`` tokens of width ``D`` (patch features), text prefix ``L`` of width ``T`` (text-
    conditioned blocks only), transformer width ``W`` and ``K`` layers, sequence ``S = L + N``, batch ``B``
    (frame-local video blocks: ``B x frames`` rows of one frame each):

        forward = B [ 2 N D W  (proj_in)  +  2 L T W  (proj_txt)
                      + K (24 S W^2  (qkv 6, out 2, MLP 16)  +  4 S^2 W  (scores and values, full square))
                      + 4 N W D  (proj_out to 2D) ]

    A multiply-add is 2 FLOPs; causal attention is counted over the full ``S x S`` square, as
    ``torch.utils.flop_counter`` counts SDPA. Norms, RoPE, softmax and the affine update are not counted.
    The backward pass costs twice the forward (gradients of inputs and weights), except in ``proj_txt``, whose
    input (the frozen text encoder's output) needs no gradient: ``2 L T W`` once. So

        step = sum over blocks of B (3 forward - 2 L T W)

    ``attention="none"``: the matmuls alone. ``attention="chunked"``: the attention counted as a CPU training step
    computes it, what ``torch.utils.flop_counter`` counts there (the two agree exactly, tested): the causal chunks
    of :func:`starflow.models.layers.causal_self_attention_in_chunks`, ``4 W sum((e - a) e)`` over its query chunks
    ``[a, e)`` instead of ``4 S^2 W``, and nothing where the flash kernel takes over (it has no FLOP rule on a CPU).
    """
    total, b = 0, x.shape[0]
    grid = patchify(x, model.patch_size)  # (B, [T,] h, w, D)
    frames = grid.shape[1] if x.dim() == 5 else 1
    n_all = frames * grid.shape[-3] * grid.shape[-2]
    for i, block in enumerate(model.blocks):
        if not isinstance(block, FlowBlock):
            continue
        d, w, k = block.in_dim, block.width, len(block.attn_blocks)
        n = n_all
        l, t = (y.shape[1], y.shape[2]) if (block.text_conditioned and y is not None) else (0, 0)
        rows = b
        if x.dim() == 5 and model._frame_local(i, True):
            rows, n = b * frames, n_all // frames
        s = l + n
        fwd = 2 * n * d * w + 2 * l * t * w + k * (24 * s * w * w + attention_flops(attention, rows * block.heads, s, w))
        fwd += 4 * n * w * d
        total += rows * (3 * fwd - 2 * l * t * w)
    return total


def attention_flops(attention: str, rows: int, s: int, w: int) -> int:
    """Forward FLOPs of one layer's attention over ``rows`` = batch x heads sequences of ``s`` positions, width ``w``
    (see :func:`step_flops` for ``attention``)."""
    if attention == "square":
        return 4 * s * s * w
    edges = causal_chunk_edges(rows, s, 4) if attention == "chunked" else None
    return 4 * w * sum((e - a) * e for a, e in zip(edges, edges[1:])) if edges else 0


def counted_flops(model: STARFlow, x: torch.Tensor, y: torch.Tensor | None) -> int:
    """FLOPs of one step as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.loss(x, y)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_function(model: STARFlow, x: torch.Tensor, y: torch.Tensor | None, precision: str):
    """One training step (forward, loss, backward; gradients dropped) under ``precision``, as
    ``Trainer.micro_step`` runs it; the returned callable gives the loss as a float."""
    bf16 = training_dtype(precision, x.device) == torch.bfloat16

    def step() -> float:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x, y)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def setup_process(args: argparse.Namespace) -> None:
    """Threads, and on a CPU the allocator setting ``starflow train`` applies (config key ``malloc_retain``)."""
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.malloc_retain:
        retain_freed_memory()


def run_one(args: argparse.Namespace) -> dict:
    """Time ``args.mode`` in this process; returns the row as a dict."""
    setup_process(args)
    cfg, model, x, y = build(args)
    if args.mode == "checkpoint":
        model.set_activation_checkpointing(1, 1)
    if args.mode == "compile":
        model.compile_training()
    cuda = x.device.type == "cuda"
    step = step_function(model, x, y, args.precision)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    times.sort()
    median, best = statistics.median(times), times[0]
    flops = step_flops(model, x, y)
    row = {"mode": args.mode, "seconds": median, "best": best, "peak_gib": peak_memory_gib(x.device), "flops": flops,
           "tflops_per_s": flops / best / 1e12, "loss": loss, "faults": faults,
           "params": sum(p.numel() for p in model.parameters()), "tokens": int(x[0].numel() // cfg.channel_size)}
    if args.mode == "eager" and args.check_flops:
        row["counted_flops"] = counted_flops(model, x, y)
        row["flops_linear"] = step_flops(model, x, y, attention="none")
        # what the counter sees: on a CPU the chunked causal attention (as matmuls), on CUDA SDPA (its full square)
        row["flops_seen"] = step_flops(model, x, y, attention="chunked" if x.device.type == "cpu" else "square")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default=None, help="a YAML config [default: the demo layout, 256 tokens, width 192]")
    parser.add_argument("--img_size", type=at_least(1), default=None, help="override the layout's img_size")
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto",
                        help="the training config key, or several comma-separated (e.g. fp32,bf16): bf16 autocast or "
                             "fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--rounds", type=at_least(1), default=1,
                        help="run every variant this many times, interleaved (every other round in reverse order), "
                             "and report its fastest step and the median of its medians: a drifting machine then "
                             "slows all variants alike [default: 1]")
    parser.add_argument("--no_check_flops", dest="check_flops", action="store_false",
                        help="skip the torch.utils.flop_counter check of the analytic count")
    parser.add_argument("--profile", type=at_least(0), default=0, metavar="N",
                        help="profile N eager steps with torch.profiler and print the operators by self time "
                             "instead of the timing table [default: 0, off]")
    parser.add_argument("--malloc_retain", type=int, choices=(0, 1), default=1,
                        help="on a CPU, keep freed memory in the process as `starflow train` does (its config key "
                             "malloc_retain; 0 = glibc's defaults, the page faults of every step) [default: 1]")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    precisions = args.precision.split(",")
    if bad := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"--precision {args.precision}: {', '.join(bad)} is not one of {', '.join(PRECISIONS)}")
    if bad := [m for m in args.modes.split(",") if m not in MODES]:
        parser.error(f"--modes {args.modes}: {', '.join(bad)} is not one of {', '.join(MODES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU")
    if args.profile:
        if len(precisions) > 1:
            parser.error(f"--profile profiles one precision; --precision {args.precision} names {len(precisions)}")
        profile(args)
        return
    if args.mode is not None:
        print(json.dumps(run_one(args)))
        return
    variants = [(mode, p) for p in precisions for mode in args.modes.split(",")]
    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for mode, precision in (variants if r % 2 == 0 else variants[::-1]):
            runs[mode, precision].append(run_child(args, mode, precision, check_flops=args.check_flops and r == 0))
    rows = []
    for variant in variants:
        row = dict(min(runs[variant], key=lambda x: x["best"]))
        row["seconds"] = statistics.median(x["seconds"] for x in runs[variant])
        row["peak_gib"] = max(x["peak_gib"] for x in runs[variant])
        row["label"] = f"{variant[0]}, {describe(variant[1], args.device)}"
        rows.append(row)
    first = next((x for run in runs.values() for x in run if "counted_flops" in x), rows[0])
    print(f"layout: {layout_name(args)}; {first['params']:,} parameters, "
          f"{first['tokens']} tokens, batch {args.batch} on {args.device} ({args.threads} threads); "
          f"{args.rounds} round(s) of {args.steps} timed steps per variant")
    if "counted_flops" in first:
        linear, attention = first["flops_linear"], first["flops"] - first["flops_linear"]
        print(f"FLOPs per step (analytic): {first['flops'] / 1e9:.3f} G = matmuls {linear / 1e9:.3f} G + attention "
              f"{attention / 1e9:.3f} G; torch.utils.flop_counter: {first['counted_flops'] / 1e9:.3f} G, analytic "
              f"{first['flops_seen'] / 1e9:.3f} G of what it sees (CPU: the causal chunks attention computes, "
              f"not the square; CUDA: SDPA's square); TFLOP/s below: {first['flops'] / 1e9:.3f} G over the best step")
    print(f"{'variant':<26}{'best ms':>10}{'median ms':>11}{'vs first':>10}{'peak GiB':>10}{'TFLOP/s':>10}"
          f"{'loss':>12}{'faults/step':>13}")
    for row in rows:
        print(f"{row['label']:<26}{row['best'] * 1e3:>10.1f}{row['seconds'] * 1e3:>11.1f}"
              f"{row['best'] / rows[0]['best']:>10.2f}{row['peak_gib']:>10.2f}{row['tflops_per_s']:>10.3f}"
              f"{row['loss']:>12.6f}{row['faults']:>13.0f}")


def profile(args: argparse.Namespace, rows: int = 20) -> None:
    """Print the ``rows`` operators with the most self time per eager step (``torch.profiler``), and their share."""
    from torch.profiler import ProfilerActivity, profile as profiler

    setup_process(args)
    cfg, model, x, y = build(args)
    cuda = x.device.type == "cuda"
    step = step_function(model, x, y, args.precision)

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profiler(activities=activities) as prof:
        for _ in range(args.profile):
            step()
        if cuda:
            torch.cuda.synchronize(x.device)
    events = prof.key_averages()
    device_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, device_time), reverse=True)
    total = sum(getattr(e, device_time) for e in events)
    print(f"layout: {layout_name(args)}, batch {args.batch}, "
          f"{describe(args.precision, args.device)}, {args.threads} threads: {args.profile} profiled eager step(s), "
          f"{total / 1e3 / args.profile:.1f} ms of {'device' if cuda else 'CPU'} self time per step")
    print(f"{'operator':<44}{'ms/step':>10}{'share':>8}{'calls/step':>12}")
    for e in events[:rows]:
        ms = getattr(e, device_time) / 1e3 / args.profile
        print(f"{e.key[:43]:<44}{ms:>10.1f}{ms * 1e3 * args.profile / total:>8.1%}{e.count / args.profile:>12.0f}")


def layout_name(args: argparse.Namespace) -> str:
    """The timed layout in words: the config file, or the scaled demo, with an ``--img_size`` override."""
    if args.layout:
        return args.layout + (f" at img_size {args.img_size}" if args.img_size else "")
    return f"demo scaled (img_size {args.img_size or DEMO_SCALED['img_size']}, channels {DEMO_SCALED['channels']})"


def describe(precision: str, device: str) -> str:
    """``"fp32"`` or ``"bf16 autocast"``: what ``precision`` trains in on ``device``."""
    return "bf16 autocast" if training_dtype(precision, torch.device(device)) == torch.bfloat16 else "fp32"


def run_child(args: argparse.Namespace, mode: str, precision: str, check_flops: bool) -> dict:
    """Time one variant in a fresh process (its own peak memory); returns its row."""
    cmd = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--precision", precision,
           "--threads", str(args.threads), "--malloc_retain", str(args.malloc_retain)]
    cmd += (["--layout", args.layout] if args.layout else []) + (["--img_size", str(args.img_size)]
                                                                 if args.img_size else [])
    cmd += [] if check_flops else ["--no_check_flops"]
    # compile in this process (no worker pool left competing for the cores while the steps are timed)
    env = child_env(TORCHINDUCTOR_COMPILE_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{mode} ({precision}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
