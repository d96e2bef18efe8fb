"""Sampling speed: sequential decoding against block-wise Jacobi iteration, measured.

For a model (default: the shipped demo ``ckpts/demo_digits``) and a batch of prompts, samples the same noise
with every strategy and prints, per strategy:

* evals: sequential model evaluations (flow-block passes that must run one after another; sequential
  decoding needs one per token per block, Jacobi one per chunk iteration);
* seconds and samples/s of the flow sampling (``STARFlow.reverse``; text encoding, denoising and VAE decoding
  are the same for every strategy and are left out);
* peak memory of the sampling: CUDA ``max_memory_allocated`` above what was allocated before (``-`` on a CPU: its
  resident set cannot show it, as what the warm-up freed is reused);
* rel. dist.: ``||x - x_seq|| / ||x_seq||`` between its result and the sequential sample (float32).

Strategies: sequential, Jacobi at block sizes 8/16/32/64 and thresholds 1e-2/1e-3/1e-4 (SPEC section 9), and
``auto`` block sizes (``starflow.models.jacobi.auto_block_size``).
Every strategy is warmed up, then all run ``--repeats`` times in interleaved rounds; the table gives the
fastest time of each.
On CUDA it also compares bf16 against fp32 weights (flow arithmetic stays in float32); with ``--compile``
every strategy runs again with compiled flow layers (``dtype`` column ``+c``; compilation in the warm-up). ``--layout`` benchmarks a config with random weights instead
of a checkpoint (random text embeddings, no text encoder), e.g. the 3B layout at 256x256 with batch 8:

    python benchmarks/sampling.py [--checkpoint_path ckpts/demo_digits] [--batch 1 8] [--device cpu|cuda]
    python benchmarks/sampling.py --layout configs/starflow_3B_t2i_256x256.yaml --batch 8 --device cuda --repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _args import at_least, non_negative_float

from starflow.models.jacobi import DecodeStats

DEMO = Path(__file__).resolve().parents[1] / "ckpts" / "demo_digits"
PROMPTS = [f"a handwritten digit {d}" for d in range(10)]
T5_XL_WIDTH = 2048  # text width of the released models' encoder (--layout's random text rows)


@dataclass
class Result:
    name: str
    dtype: str
    evals: int
    seconds: float
    samples_per_s: float
    peak_mib: float
    distance: float | None


@contextlib.contextmanager
def peak_memory(device: torch.device, out: list[float]):
    """Append the peak memory (MiB) used inside the block to ``out``: CUDA's allocator peak; NaN on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        return
    yield  # (a CPU's resident set cannot show it: what the warm-up freed is reused, so the growth reads ~0)
    out.append(float("nan"))


def load(args: argparse.Namespace, device: torch.device):
    """The flow, its config, a function ``inputs(batch) -> (y, noise)`` (guidance-ready text rows and noise)
    and a description of the model."""
    from starflow.adapters import vae_geometry
    from starflow.config import load_config
    from starflow.models import STARFlow
    from starflow.sampling.pipeline import Pipeline
    from starflow.sizing import latent_shape

    if args.layout:
        cfg = load_config(args.layout)
        if args.img_size:
            cfg.img_size = args.img_size
        with torch.device(device):
            model = STARFlow.from_config(cfg, txt_dim=(args.txt_dim or T5_XL_WIDTH) if cfg.txt_size > 0 else None,
                                         vae_downsample=vae_geometry(cfg.vae).downsample).eval()
        shape = latent_shape(cfg)  # (C, h, w), or (T', C, h, w): every latent frame of a video config's clips
        source = f"{args.layout} (random weights)"

        def text(batch: int) -> torch.Tensor | None:
            gen = torch.Generator().manual_seed(args.seed)
            return None if model.txt_dim is None else torch.randn(2 * batch, cfg.txt_size, model.txt_dim, generator=gen)
    else:
        pipe = Pipeline.from_pretrained(args.checkpoint_path, device=device)
        model, cfg, shape, source = pipe.model, pipe.config, pipe.latent_shape(), args.checkpoint_path

        def text(batch: int) -> torch.Tensor | None:
            prompts = (PROMPTS * batch)[:batch]
            y = pipe.encode_prompts(prompts)
            return None if y is None else torch.cat([y, pipe.encode_prompts([""] * batch)])

    def inputs(batch: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        y = text(batch)
        noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(args.seed))
        return None if y is None else y.to(device), noise.to(device)

    return model, cfg, inputs, source


def measure(model, y, noise, named: list[tuple[str, dict]], guidance: float, repeats: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, int, float, float]]:
    """Per strategy name: (sample, sequential evaluations, fastest seconds, peak MiB).

    The strategies are timed in rounds, each round running every strategy once (in reverse order every other
    round), so a slow phase of the machine (shared CPUs drift by tens of percent over minutes) slows all of them
    alike instead of whichever ran then."""
    yd = None if y is None else y.to(dtype)

    def run(strategy: dict, stats=None) -> torch.Tensor:
        return model.reverse(noise, yd, guidance=guidance if y is not None else 0.0, stats=stats, **strategy)

    for _, strategy in named:  # warm-up (allocator, kernels; compilation of a few shapes, hence twice)
        run(strategy)
        run(strategy)
    best = {name: float("inf") for name, _ in named}
    peaks: dict[str, list[float]] = {name: [] for name, _ in named}
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for r in range(repeats):
        for name, strategy in (named if r % 2 == 0 else named[::-1]):  # no strategy always runs first
            stats = DecodeStats()
            with peak_memory(device, peaks[name]):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                x = run(strategy, stats)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
            out[name] = (x.float(), stats.evaluations)
    return {name: (*out[name], best[name], max(peaks[name])) for name, _ in named}


def strategies(block_sizes: list[int], thresholds: list[float], max_iter: int, stop: str) -> list[tuple[str, dict]]:
    out = [("sequential", dict(jacobi=False))]
    for k in block_sizes:
        for th in thresholds:
            out.append((f"jacobi k={k} th={th:g}", dict(jacobi=True, jacobi_block_size=k, jacobi_th=th,
                                                          jacobi_max_iter=max_iter, jacobi_stop=stop)))
    for th in thresholds:  # --jacobi_block_size auto: chosen per block from its rows and the device
        out.append((f"jacobi k=auto th={th:g}", dict(jacobi=True, jacobi_block_size="auto", jacobi_th=th,
                                                       jacobi_max_iter=max_iter, jacobi_stop=stop)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", default=str(DEMO), help="model folder [default: the shipped demo]")
    parser.add_argument("--layout", default=None, help="a config to benchmark with random weights instead")
    parser.add_argument("--img_size", type=at_least(1), default=None, help="with --layout: override img_size")
    parser.add_argument("--txt_dim", type=at_least(1), default=None,
                        help=f"with --layout: text width [default: {T5_XL_WIDTH}, T5-XL]")
    parser.add_argument("--batch", type=at_least(1), nargs="+", default=[1, 8],
                        help="samples per batch, one table block each [default: 1 8]")
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight [default: the config's cfg]")
    parser.add_argument("--block_sizes", type=at_least(1), nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--thresholds", type=non_negative_float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--max_iter", type=at_least(1), default=32, help="Jacobi iteration cap per chunk [default: 32]")
    parser.add_argument("--jacobi_stop", choices=("sample", "batch"), default="sample",
                        help="Jacobi stopping rule (see starflow sample --help) [default: sample]")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed runs per strategy [default: 3]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time every strategy with compiled flow layers (STARFlow.compile_layers)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="CPU threads [default: torch's]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.layout and (args.img_size or args.txt_dim):
        parser.error("--img_size and --txt_dim describe a --layout's random model; a checkpoint has its own")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, cfg, inputs, source = load(args, device)
    guidance = cfg.cfg if args.cfg is None else args.cfg
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"model {source}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, guidance {guidance:g}, "
          f"{where}; times are the fastest of {args.repeats} interleaved rounds of STARFlow.reverse after a warm-up")
    header = (f"{'batch':>5}  {'dtype':<11}{'strategy':<26}{'evals':>7}{'seconds':>10}{'samples/s':>11}"
              f"{'peak MiB':>10}{'rel. dist.':>12}{'evals x':>9}{'speed x':>9}")
    print(header)
    references = {}  # per batch: the float32 sequential sample
    float32_weights = {k: v.clone() for k, v in model.state_dict().items()}  # (a bf16 round trip would round them)
    for compiled in (False, True) if args.compile else (False,):
        if compiled:
            model.compile_layers()
        for batch in args.batch:
            y, noise = inputs(batch)
            for dtype in dtypes:
                model.to(dtype)
                if dtype == torch.float32:
                    model.load_state_dict(float32_weights)
                base = None
                named = strategies(args.block_sizes, args.thresholds, args.max_iter, args.jacobi_stop)
                results = measure(model, y, noise, named, guidance, args.repeats, device, dtype)
                for name, _ in named:
                    x, evals, seconds, peak = results[name]
                    reference = references.setdefault(batch, x)
                    r = Result(name, str(dtype).removeprefix("torch.") + ("+c" if compiled else ""), evals, seconds,
                               batch / seconds, peak, ((x - reference).norm() / reference.norm()).item())
                    base = base or r
                    print(f"{batch:>5}  {r.dtype:<11}{r.name:<26}{r.evals:>7}{r.seconds:>10.3f}{r.samples_per_s:>11.2f}"
                          f"{'-' if r.peak_mib != r.peak_mib else f'{r.peak_mib:.1f}':>10}{r.distance:>12.2e}"
                          f"{base.evals / r.evals:>9.1f}"
                          f"{base.seconds / r.seconds:>9.2f}", flush=True)
            model.to(torch.float32)
    print("evals x / speed x: sequential evaluations and seconds of sequential decoding (same batch and dtype) "
          "over the strategy's; rel. dist. to the float32 sequential sample; +c: compiled layers")


if __name__ == "__main__":
    main()
