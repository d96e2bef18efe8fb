"""Sampling a list of captions into a folder, split over the ranks of ``torch.distributed``."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from starflow.data.aspect import ASPECT_RATIOS
from starflow.distributed import DistInfo
from starflow.models.jacobi import DecodeStats
from starflow.sampling.io import sample_stem, save_sample
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings
from starflow.signals import StopSignals, Stopped, agreed_stop

__all__ = ["write_samples", "sample_aspect_ratios", "RANDOM_ASPECT"]

RANDOM_ASPECT = "random"
"""``--aspect_ratio random``: each sample draws one of the trained ratios from its seed."""


def sample_aspect_ratios(aspect_ratio: str, seed: int, n: int) -> list[str]:
    """The aspect ratio of samples ``0..n-1``: ``aspect_ratio`` for all, or with ``"random"`` one of
    :data:`~starflow.data.aspect.ASPECT_RATIOS` per sample, drawn from ``random.Random(seed + i)`` (so a sample's
    ratio, like its noise, does not depend on the batch or the ranks)."""
    if aspect_ratio != RANDOM_ASPECT:
        return [aspect_ratio] * n
    return [random.Random(seed + i).choice(ASPECT_RATIOS) for i in range(n)]


def write_samples(pipe: Pipeline, captions: list[str], settings: SampleSettings, out: Path, *, seed: int,
                  batch_size: int, dist: DistInfo, gif: bool = False, lossless: bool = False,
                  inputs: Mapping[str, torch.Tensor] | None = None,
                  profile: Profile | None = None, stats: DecodeStats | None = None,
                  indices: Sequence[int] | None = None, stem: Callable[[Path, int, str], Path] = sample_stem,
                  progress: str = "sample", negatives: Sequence[str] | None = None,
                  return_sequence: bool = False, stop: StopSignals | None = None,
                  full_batches: bool = False, sample_seeds: Callable[[int], int] | None = None) -> tuple[int, ...]:
    """Sample caption ``i`` with seed ``seed + i`` (or ``sample_seeds(i)``) into ``stem(out, i, captions[i])`` (see
    :func:`starflow.sampling.io.save_sample`), for every ``i`` of ``indices`` (default: all captions).

    The indices are split across ranks round-robin; every rank runs the same number of batches (the last ones
    padded with a repeat whose sample is dropped), as sharded weights need all ranks in every step. Each
    sample's noise comes from its own seed, so the files do not depend on ``batch_size`` or the ranks (up to float
    rounding; exactly with ``full_batches``). With
    ``settings.aspect_ratio == "random"`` the samples are grouped by their ratio (:func:`sample_aspect_ratios`)
    and each group is batched on its own.

    Args:
        pipe: the pipeline.
        captions: one caption per sample.
        settings: guidance, Jacobi, denoising, size and length options.
        out: the output folder (must exist).
        seed: seed of sample 0.
        batch_size: samples per forward batch on each rank.
        dist: this process's rank and world size.
        gif: videos: also write an animated GIF.
        lossless: videos: write the MP4 losslessly (see :func:`~starflow.data.video.write_video`).
        inputs: video models: conditioning pixels shared by every sample, by :class:`Pipeline` argument name
            (``input_image``, ``input_video``, ``last_image``), each with a leading batch axis of 1;
            ``input_video`` of a ``video_to_video`` model goes to :meth:`Pipeline.video_to_video`.
        profile, stats: optional per-stage timer and evaluation counter.
        indices: the samples to make (e.g. those a resumed run still lacks).
        stem: the output path of sample ``i`` without suffix.
        progress: the progress bar's label (rank 0 shows it, counting the samples of every rank).
        negatives: one negative prompt per caption (the unconditional guidance rows), or None (all ``""``).
        return_sequence: also write ``stem_sequence.png`` (``.mp4`` for videos): the noise, each flow block's
            output and the result, decoded side by side (see ``sequence`` in :meth:`Pipeline.__call__`).
        stop: installed :class:`~starflow.signals.StopSignals`: after each batch (its files written) a signal any
            rank received stops every rank.
        full_batches: pad every batch to ``batch_size`` samples (repeats, not written), so that every sample is
            decoded at the same row count whichever batch it falls in. Matrix products round by their row count
            (CPU and GPU kernels are chosen by it), so without this a rank's short last batch, which depends on the
            number of ranks and on what a resumed run still lacks, can move a sample by ~1e-5 (now and then one
            8-bit level of a pixel). ``generate-set`` sets it; one-off sampling does not pay for the padding.
        sample_seeds: the seed of sample ``i``, instead of ``seed + i`` (``generate-set``: independent sets per
            seed, :func:`~starflow.evaluation.generate.set_sample_seed`).

    Returns:
        The shape of one batch of samples, ``(B, C, H, W)`` or ``(B, T, C, H, W)`` (``()`` when there was none).

    Raises:
        ValueError: ``return_sequence`` with an ``input_video`` for a ``video_to_video`` model, and the errors of the
            :class:`Pipeline` call.
        Stopped: ``stop`` received a signal; the batches before it are written.
    """
    fps = settings.fps or pipe.config.fps or None
    todo = list(range(len(captions))) if indices is None else list(indices)
    ratios = sample_aspect_ratios(settings.aspect_ratio, seed, len(captions))
    groups: dict[str, list[int]] = {}
    for i in todo:
        groups.setdefault(ratios[i], []).append(i)
    schedule = []  # (aspect ratio, this rank's indices, None = padding, the group's first index, the group's size)
    for ratio, group in groups.items():
        per_rank = -(-len(group) // dist.world_size)
        mine: list[int | None] = group[dist.rank :: dist.world_size]
        schedule.append((ratio, mine + [None] * (per_rank - len(mine)), group[0], len(group)))
    shape: tuple[int, ...] = ()
    # rank 0's bar counts the samples of every rank: the ranks run the same batches in step, and batch [s, s + b) of
    # each rank's share holds positions [s W, (s + b) W) of its group (W ranks)
    world = dist.world_size
    bar = tqdm(total=len(todo), disable=not dist.is_main, desc=progress, unit="img", dynamic_ncols=True)
    batches = [(ratio, mine[s : s + batch_size], pad, min(n, (s + batch_size) * world) - min(n, s * world))
               for ratio, mine, pad, n in schedule for s in range(0, len(mine), batch_size)]
    done = 0
    for ratio, idx, pad, made in batches:
        settings_b = replace(settings, aspect_ratio=ratio)
        real = [pad if i is None else i for i in idx]  # padding repeats a sample of the group (its file is not written)
        if full_batches:
            real += [real[-1]] * (batch_size - len(real))
        batch = {k: v.expand(len(real), *v.shape[1:]) for k, v in (inputs or {}).items()}
        prompts = [captions[i] for i in real]
        seeds = [seed + i if sample_seeds is None else sample_seeds(i) for i in real]
        if negatives is not None and any(negatives):
            batch["negative_prompts"] = [negatives[i] for i in real]
        if "input_video" in batch and pipe.config.video_to_video:
            if return_sequence:
                raise ValueError("return_sequence is not supported for video-to-video")
            pixels = pipe.video_to_video(prompts, batch["input_video"], settings_b, seeds=seeds, profile=profile,
                                         stats=stats, negative_prompts=batch.get("negative_prompts"))
        else:
            sequence = [] if return_sequence else None
            pixels = pipe(prompts, settings_b, seeds=seeds, profile=profile, stats=stats, sequence=sequence, **batch)
        shape = tuple(pixels.shape)
        for r, (i, sample) in enumerate(zip(idx, pixels)):
            if i is not None:
                save_sample(sample, stem(out, i, captions[i]), fps, gif, lossless)
                if return_sequence:
                    panels = torch.cat([stage[r] for stage in sequence], dim=-1)  # side by side
                    path = stem(out, i, captions[i])
                    save_sample(panels, path.with_name(path.name + "_sequence"), fps)
        bar.update(made)
        done += made
        signum = agreed_stop(stop, pipe.device) if stop is not None else 0
        if signum:
            bar.close()
            raise Stopped(signum, f"after {done} of the {len(todo)} samples of this run")
    bar.close()
    if dist.distributed:
        torch.distributed.barrier()
    return shape
