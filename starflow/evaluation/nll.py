"""Exact likelihood of a model on an image folder (bits/dim), shared by ``starflow eval-nll`` and benchmarks.

A normalizing flow gives the exact density of its training data, which is the VAE latent (or pixel)
plus Gaussian noise of std ``noise_std`` (STARFlow, arXiv 2506.06276, Sec. 3.1), or for ``noise_type: uniform``
the 8-bit pixels dequantised with uniform noise. The number reported is
that density, averaged over noise draws: a statement about the noised data, not a bound on the clean data.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from starflow.data import ImageFolder, collate, sample_seed
from starflow.data.images import CorruptImageError, image_size
from starflow.models.starflow import DEQUANTISED_BITS, HALF_LOG_2PI, noised_data

__all__ = ["NLLResult", "evaluate_nll", "PIXEL_SCALE_BITS", "pixel_scale_bits"]

PIXEL_SCALE_BITS = math.log2(127.5)  # [-1, 1] -> [0, 255]: log-Jacobian per dimension, in bits


def pixel_scale_bits(config) -> float:
    """Bits/dim to add for the 8-bit pixel scale: ``log2(127.5)`` ([-1, 1] -> [0, 255]) for Gaussian noise, 7 for
    ``noise_type: uniform``, whose dequantised data ``(k + u) / 128 - 1`` has bins of width 1/128 (then the number is
    the usual bound on the discrete 8-bit NLL)."""
    return DEQUANTISED_BITS if config.noise_type == "uniform" else PIXEL_SCALE_BITS


@dataclass
class NLLResult:
    """Average negative log-likelihood.

    Attributes:
        images: images evaluated.
        nats_per_dim: full NLL of the noised data per dimension (nats), in the units the flow models: pixels in
            ``[-1, 1]`` for pixel-space models, normalised (scaled and shifted) VAE latents otherwise.
        bits_per_dim: the same in bits.
        pixel_bits_per_dim: on the 8-bit pixel scale (pixel-space models only; adds :func:`pixel_scale_bits`).
        bits_per_dim_ci95: half-width of the 95% interval of ``bits_per_dim`` over images
            (``1.96 * std / sqrt(images)`` of the per-image values; 0 for one image).
        resized: images whose files are not at the model's ``img_size`` (square models): each was resized and
            centre-cropped to it, so its bits/dim are those of the resized image, not of the file.
    """

    images: int
    nats_per_dim: float
    bits_per_dim: float
    pixel_bits_per_dim: float | None
    bits_per_dim_ci95: float = 0.0
    resized: int = 0


def _refusing_unreadable(batches: Iterable[dict]) -> Iterator[dict]:
    """``batches``, an unreadable image (:class:`~starflow.data.images.CorruptImageError`) refused by name."""
    try:
        yield from batches
    except CorruptImageError as err:
        raise ValueError(f"{err}: the NLL is over every listed image; fix the file or drop its line") from None


def _size_of(path) -> tuple[int, int] | None:
    """An image's ``(width, height)``, or None when its header is unreadable (the loader then says so)."""
    try:
        return image_size(path)
    except OSError:  # (CorruptImageError is one)
        return None


@torch.no_grad()
def evaluate_nll(pipe, folder: str, batch_size: int = 256, noise_samples: int = 1, seed: int = 0,
                 progress: bool = True, num_samples: int | None = None, rank: int = 0,
                 world_size: int = 1) -> NLLResult:
    """Bits/dim of ``pipe.model`` on an image folder, conditioned on each image's caption.

    Image ``i`` gets the noise draws of ``sample_seed(seed, i, k)``, so the result is the same on any number
    of processes; under ``torch.distributed`` each rank takes images ``rank, rank + world_size, ...`` and the
    sums are all-reduced (every rank must call this).

    Args:
        pipe: a :class:`~starflow.sampling.pipeline.Pipeline`.
        folder: image folder with ``metadata.jsonl``.
        batch_size: images per batch.
        noise_samples: noise draws per image (the training noise: Gaussian, or uniform dequantisation).
        seed: seed of the noise draws.
        progress: show a progress bar (rank 0).
        num_samples: evaluate only the first ``num_samples`` images (default: all).
        rank, world_size: this process's share of the images.

    Raises:
        ValueError: ``num_samples`` or ``noise_samples`` below 1, or a listed image missing or unreadable.
    """
    if (num_samples is not None and num_samples < 1) or noise_samples < 1:
        raise ValueError(f"--num_samples and --noise_samples must be >= 1, got {num_samples} and {noise_samples}")
    cfg = pipe.config
    draw = torch.rand if cfg.noise_type == "uniform" else torch.randn
    pixel_channels = cfg.channel_size if pipe.vae.downsample == 1 else 3
    data = ImageFolder(folder, cfg.img_size, pixel_channels, multiple=pipe.vae.downsample * cfg.patch_size,
                       substitute=False)
    if data.skipped:  # (training replaces such files; a likelihood of the folder must not)
        raise ValueError(f"{len(data.skipped)} file(s) listed in {folder}/metadata.jsonl are missing, e.g. "
                         f"{sorted(data.skipped)[0]}: the NLL is over every listed image; restore them or drop their lines")
    n = len(data) if num_samples is None else min(num_samples, len(data))
    mine = list(range(rank, n, world_size))
    sums = torch.zeros(4, dtype=torch.float64)  # sum, sum of squares, count of per-image nats/dim; resized images
    if not cfg.mix_aspect:  # (a mix_aspect model takes each image at its bucket: resized by design)
        sums[3] = sum(_size_of(data.paths[i]) not in (None, (cfg.img_size, cfg.img_size)) for i in mine)
    start = 0
    loader = DataLoader(Subset(data, mine), batch_size=batch_size, collate_fn=collate)
    for batch in _refusing_unreadable(tqdm(loader, desc="eval-nll", disable=not progress or rank != 0)):
        index = mine[start : start + len(batch["text"])]
        start += len(index)
        latents = pipe.vae.encode(batch["pixels"].to(pipe.device), sample=False).float()
        y = pipe.encode_prompts(batch["text"], fps=0)  # images: a video model's image prompt, as training gives it
        per_image = torch.zeros(len(index), dtype=torch.float64)
        for k in range(noise_samples):  # the training noise (noise_type): Gaussian, or 8-bit dequantisation
            noise = torch.stack([draw(latents.shape[1:], generator=torch.Generator().manual_seed(
                sample_seed(seed, i, k))) for i in index]).to(latents.device)
            nats = pipe.model.nll(noised_data(latents, noise, cfg), y)
            per_image += nats.cpu().double() / noise_samples  # (float64 on the CPU: MPS has none)
        sums[:3] += torch.stack([per_image.sum(), per_image.square().sum(), torch.tensor(float(len(index)))])
    if world_size > 1:  # reduced on the model's device: NCCL has no CPU tensors
        sums = sums.to(pipe.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    total, squares, count, resized = sums.tolist()
    mean = total / count
    var = max(0.0, (squares - count * mean * mean) / (count - 1)) if count > 1 else 0.0
    nats = mean + HALF_LOG_2PI
    bpd = nats / math.log(2)
    pixel = bpd + pixel_scale_bits(cfg) if pipe.vae.downsample == 1 else None
    return NLLResult(int(count), nats, bpd, pixel, 1.96 * math.sqrt(var / count) / math.log(2), int(resized))
