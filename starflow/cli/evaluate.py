"""Evaluation commands: ``starflow eval-nll`` (exact bits/dim of a model on an image folder)."""
from __future__ import annotations

import argparse

from starflow import assets
from starflow.cli._flags import add_device_flag

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-nll`` to the subcommands."""
    p = sub.add_parser("eval-nll", help="exact bits/dim of a model on an image folder")
    p.add_argument("--checkpoint_path", default=None, help="model folder or weights [default: shipped demo]")
    p.add_argument("--model_config_path", default=None, help="YAML config [default: config.yaml beside the weights]")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--noise_samples", type=int, default=1, help="noise draws per image [default: 1]")
    p.add_argument("--seed", type=int, default=0)
    add_device_flag(p, "cpu, cuda ... [default: cpu]")
    p.set_defaults(func=eval_nll)


def eval_nll(args: argparse.Namespace) -> int:
    """:func:`starflow.evaluation.evaluate_nll` of a model folder on ``--data``."""
    from starflow.evaluation import evaluate_nll
    from starflow.sampling.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint_path or assets.DEMO_DIR, config=args.model_config_path,
                                    device=args.device or "cpu")
    r = evaluate_nll(pipe, args.data, args.batch_size, args.noise_samples, args.seed)
    space = "latents" if pipe.vae.downsample > 1 else "pixels"
    print(f"images: {r.images} x {args.noise_samples} noise draws from {args.data}")
    print(f"NLL of the noised {space}: {r.nats_per_dim:.4f} nats/dim = {r.bits_per_dim:.4f} bits/dim (data in [-1, 1])")
    if r.pixel_bits_per_dim is not None:
        print(f"bits/dim on the 8-bit pixel scale: {r.pixel_bits_per_dim:.4f} (adds log2(127.5) for [-1, 1] -> [0, 255])")
    print(f"Noise: the flow models x + {pipe.config.noise_std} * N(0, I) (the training noise_std); this is the exact "
          "density of that noised data, averaged over the noise draws, not a bound on the clean data.")
    return 0
