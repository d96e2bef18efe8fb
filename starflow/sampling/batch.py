"""Sampling a list of captions into a folder, split over the ranks of ``torch.distributed``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from starflow.distributed import DistInfo
from starflow.models.jacobi import DecodeStats
from starflow.sampling.io import sample_stem, save_sample
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings

__all__ = ["write_samples"]


def write_samples(pipe: Pipeline, captions: list[str], settings: SampleSettings, out: Path, *, seed: int,
                  batch_size: int, dist: DistInfo, gif: bool = False, inputs: Mapping[str, torch.Tensor] | None = None,
                  profile: Profile | None = None, stats: DecodeStats | None = None,
                  indices: Sequence[int] | None = None, stem: Callable[[Path, int, str], Path] = sample_stem,
                  progress: str = "sample", negatives: Sequence[str] | None = None) -> tuple[int, ...]:
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
        inputs: video models: conditioning pixels shared by every sample, by :class:`Pipeline` argument name
            (``input_image``, ``input_video``, ``last_image``), each with a leading batch axis of 1;
            ``input_video`` of a ``video_to_video`` model goes to :meth:`Pipeline.video_to_video`.
        profile, stats: optional per-stage timer and evaluation counter.
        indices: the samples to make (e.g. those a resumed run still lacks).
        stem: the output path of sample ``i`` without suffix.
        progress: the progress bar's label (rank 0 shows it, counting this rank's samples).
        negatives: one negative prompt per caption (the unconditional guidance rows), or None (all ``""``).

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
        batch = {k: v.expand(len(real), *v.shape[1:]) for k, v in (inputs or {}).items()}
        prompts, seeds = [captions[i] for i in real], [seed + i for i in real]
        if negatives is not None and any(negatives):
            batch["negative_prompts"] = [negatives[i] for i in real]
        if "input_video" in batch and pipe.config.video_to_video:
            if "negative_prompts" in batch:
                raise ValueError("negative prompts are not supported for video-to-video")
            pixels = pipe.video_to_video(prompts, batch["input_video"], settings, seeds=seeds, profile=profile,
                                         stats=stats)
        else:
            pixels = pipe(prompts, settings, seeds=seeds, profile=profile, stats=stats, **batch)
        shape = tuple(pixels.shape)
        for i, sample in zip(idx, pixels):
            if i is not None:
                save_sample(sample, stem(out, i, captions[i]), fps, gif)
        bar.update(len(idx))
    bar.close()
    if dist.distributed:
        torch.distributed.barrier()
    return shape
