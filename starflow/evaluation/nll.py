"""Exact likelihood of a model on an image folder (bits/dim), shared by ``starflow eval-nll`` and benchmarks.

A normalizing flow gives the exact density of its training data, which is the VAE latent (or pixel)
plus Gaussian noise of std ``noise_std`` (STARFlow, arXiv 2506.06276, Sec. 3.1). The number reported is
that density, averaged over noise draws: a statement about the noised data, not a bound on the clean data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from starflow.data import ImageFolder, collate
from starflow.models.starflow import HALF_LOG_2PI

__all__ = ["NLLResult", "evaluate_nll", "PIXEL_SCALE_BITS"]

PIXEL_SCALE_BITS = math.log2(127.5)  # [-1, 1] -> [0, 255]: log-Jacobian per dimension, in bits


@dataclass
class NLLResult:
    """Average negative log-likelihood.

    Attributes:
        images: images evaluated.
        nats_per_dim: full Gaussian NLL of the noised data per dimension (nats), data in ``[-1, 1]`` units.
        bits_per_dim: the same in bits.
        pixel_bits_per_dim: on the 8-bit pixel scale (pixel-space models only; adds ``log2(127.5)``).
    """

    images: int
    nats_per_dim: float
    bits_per_dim: float
    pixel_bits_per_dim: float | None


@torch.no_grad()
def evaluate_nll(pipe, folder: str, batch_size: int = 256, noise_samples: int = 1, seed: int = 0,
                 progress: bool = True) -> NLLResult:
    """Bits/dim of ``pipe.model`` on an image folder, conditioned on each image's caption.

    Args:
        pipe: a :class:`~starflow.sampling.pipeline.Pipeline`.
        folder: image folder with ``metadata.jsonl``.
        batch_size: images per batch.
        noise_samples: Gaussian noise draws per image.
        seed: seed of the noise draws.
    """
    cfg = pipe.config
    pixel_channels = cfg.channel_size if pipe.vae.downsample == 1 else 3
    data = ImageFolder(folder, cfg.img_size, pixel_channels, multiple=pipe.vae.downsample * cfg.patch_size)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in tqdm(DataLoader(data, batch_size=batch_size, collate_fn=collate), desc="eval-nll", disable=not progress):
        latents = pipe.vae.encode(batch["pixels"].to(pipe.device), sample=False).float()
        y = pipe.encode_prompts(batch["text"])
        for _ in range(noise_samples):
            x = latents + cfg.noise_std * torch.randn(latents.shape, generator=gen).to(latents.device)
            total += pipe.model.nll(x, y).sum().item()
            count += x.shape[0]
    nats = total / count + HALF_LOG_2PI
    bpd = nats / math.log(2)
    pixel = bpd + PIXEL_SCALE_BITS if pipe.vae.downsample == 1 else None
    return NLLResult(count // noise_samples, nats, bpd, pixel)
