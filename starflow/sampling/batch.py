"""Sampling a list of captions into a folder, split over the ranks of ``torch.distributed``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from starflow.distributed import DistInfo
from starflow.models.jacobi import DecodeStats
from starflow.sampling.io import sample_stem, save_sample
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings

__all__ = ["write_samples"]


def write_samples(pipe: Pipeline, captions: list[str], settings: SampleSettings, out: Path, *, seed: int,
                  batch_size: int, dist: DistInfo, gif: bool = False, input_image: torch.Tensor | None = None,
                  profile: Profile | None = None, stats: DecodeStats | None = None,
                  indices: Sequence[int] | None = None, stem: Callable[[Path, int, str], Path] = sample_stem,
                  progress: str = "sample") -> tuple[int, ...]:
    """Sample caption ``i`` with seed ``seed + i`` into ``stem(out, i, captions[i])`` (see
    :func:`starflow.sampling.io.save_sample`), for every ``i`` of ``indices`` (default: all captions).

    The indices are split across ranks round-robin; every rank runs the same number of batches (the last ones
    padded with a repeat whose sample is dropped), as sharded weights need all ranks in every step. Each
    sample's noise comes from its own seed, so the files do not depend on ``batch_size`` or the ranks.

    Args:
        pipe: the pipeline.
        captions: one caption per sample.
        settings: guidance, Jacobi, denoising, size and length options.
        out: the output folder (must exist).
        seed: seed of sample 0.
        batch_size: samples per forward batch on each rank.
        dist: this process's rank and world size.
        gif: videos: also write an animated GIF.
        input_image: video models: ``(1, C, H, W)`` first frame in ``[-1, 1]`` (image-to-video) for every sample.
        profile, stats: optional per-stage timer and evaluation counter.
        indices: the samples to make (e.g. those a resumed run still lacks).
        stem: the output path of sample ``i`` without suffix.
        progress: the progress bar's label (rank 0 shows it, counting this rank's samples).

    Returns:
        The shape of one batch of samples, ``(B, C, H, W)`` or ``(B, T, C, H, W)`` (``()`` when there was none).
    """
    fps = pipe.config.fps or None
    todo = list(range(len(captions))) if indices is None else list(indices)
    per_rank = -(-len(todo) // dist.world_size)
    mine: list[int | None] = todo[dist.rank :: dist.world_size]
    mine += [None] * (per_rank - len(mine))
    shape: tuple[int, ...] = ()
    bar = tqdm(total=per_rank, disable=not dist.is_main, desc=progress, unit="img", dynamic_ncols=True)
    for start in range(0, per_rank, batch_size):
        idx = mine[start : start + batch_size]
        real = [0 if i is None else i for i in idx]
        pixels = pipe([captions[i] for i in real], settings, seeds=[seed + i for i in real], profile=profile,
                      stats=stats, input_image=None if input_image is None else input_image.expand(len(real), -1, -1, -1))
        shape = tuple(pixels.shape)
        for i, sample in zip(idx, pixels):
            if i is not None:
                save_sample(sample, stem(out, i, captions[i]), fps, gif)
        bar.update(len(idx))
    bar.close()
    if dist.distributed:
        torch.distributed.barrier()
    return shape
