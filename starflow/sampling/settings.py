"""Sampling options (:class:`SampleSettings`), their model-dependent checks and the per-stage timer (:class:`Profile`).

The option names are the official ``sample.py`` flags; :mod:`starflow.sampling.pipeline` consumes them.
"""
from __future__ import annotations

import math
import numbers
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from starflow.config import GUIDANCE_RULE, Config
from starflow.data.aspect import bucket_name
from starflow.models.jacobi import AUTO, JACOBI_MAX_ITER, JACOBI_THRESHOLD, DecodeStats

__all__ = ["SampleSettings", "Profile", "check_settings"]


@dataclass
class SampleSettings:
    """Sampling options (names as the official ``sample.py`` flags; ``temperature`` is this package's own)."""

    cfg: float = 0.0
    jacobi: bool = True
    jacobi_th: float = JACOBI_THRESHOLD  # the official scripts use 1e-3 (images: block 16, video: block 32)
    jacobi_block_size: int | str = AUTO  # starflow.models.jacobi.auto_block_size, or tokens per chunk
    jacobi_auto_batch: int | None = None  # "auto" chooses for this batch (a job's batch size); None: each call's
    jacobi_max_iter: int = JACOBI_MAX_ITER
    aspect_ratio: str = "1:1"
    self_denoise: bool = True
    anneal_guidance: bool = False
    jacobi_stop: str = "sample"  # "sample": results independent of batch and ranks; "batch": the official rule
    target_length: int | None = None  # video: pixel frames to generate (default: the config's vid_size frames)
    context_length: int | None = None  # video: latent frames carried into each new window (default min(16, W - 1))
    guide_top: int | None = None  # guide only the first K blocks in sampling order (deep first); None = all
    attn_temp: float = 1.0  # attention temperature of the unconditional guidance rows
    temperature: float = 1.0  # the sampled Gaussian noise is scaled by it (config key temperature; 1 = official)
    fps: int | None = None  # video: the frame rate of the prompt (fps_cond) and the written file (default: config)
    target_noise_std: float | None = None  # noise level of the prompt (cond_noise_level), the prefix and Tweedie step
    self_denoising_lr: float | None = None  # denoising step: Tweedie factor (default 1), learned denoiser (0.3)
    learnable_denoiser: bool = True  # False: a video model with a learnable denoiser takes the Tweedie step
    denoising_batch_size: int | None = None  # samples per denoising pass (default: the whole batch)

    def __post_init__(self) -> None:
        """Refuse values no sampler could use (model-independent; :meth:`Pipeline.__call__` checks the rest), and
        name a trained aspect bucket spelled otherwise (``32:18``, ``1:1.0``) as the bucket: its size and its prompt.

        Raises:
            TypeError: a number field holding something else (e.g. a string).
            ValueError: named after the field, as the ``starflow sample`` flag of the same name.
        """
        self.aspect_ratio = bucket_name(self.aspect_ratio)
        for name in ("cfg", "jacobi_th", "attn_temp", "temperature", "target_noise_std", "self_denoising_lr",
                     "jacobi_max_iter", "target_length", "context_length", "fps", "denoising_batch_size",
                     "jacobi_auto_batch", "guide_top"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{name} {value!r}: must be a number")
        rules = [("cfg", 0 <= self.cfg < float("inf"), GUIDANCE_RULE),
                 ("jacobi_th", self.jacobi_th >= 0, "the stopping threshold must be >= 0"),
                 ("attn_temp", self.attn_temp > 0, "the attention temperature must be > 0 (1 = plain guidance)"),
                 ("temperature", 0 < self.temperature < float("inf"),
                  "the noise temperature must be > 0 and finite (1 = the official sampling)"),
                 ("target_noise_std", self.target_noise_std is None or self.target_noise_std >= 0,
                  "a noise level must be >= 0"),
                 ("self_denoising_lr", self.self_denoising_lr is None or self.self_denoising_lr >= 0,
                  "the denoising step must be >= 0"),
                 ("jacobi_stop", self.jacobi_stop in ("sample", "batch"), "must be sample or batch"),
                 ("guide_top", self.guide_top is None or self.guide_top >= 0, "must be >= 0")]
        rules += [(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be >= 1")
                  for name in ("jacobi_max_iter", "target_length", "context_length", "fps", "denoising_batch_size",
                               "jacobi_auto_batch")]
        for name, ok, why in rules:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"{name} {value:g}: {why}" if isinstance(value, float) else f"{name} {value}: {why}")
        for name in ("jacobi_th", "attn_temp", "target_noise_std", "self_denoising_lr"):  # (inf saturates the pixels)
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} {value}: must be a finite number")

    @property
    def noise_std(self) -> float | None:
        """The noise level sampling assumes (``target_noise_std``), or None for the config's ``noise_std``."""
        return self.target_noise_std


@dataclass
class Profile:
    """Seconds (and sequential flow evaluations) spent per stage (``starflow sample --profile``).

    Stages are named as they run: ``"text encoding"``, one per flow block (``"flow block 3 (deep)"`` ...),
    ``"denoising"``, ``"VAE decoding"`` (and ``"VAE encoding"`` for image-to-video). On CUDA each stage is
    bracketed by device synchronisations, so the times are the GPU's.
    """

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    evaluations: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @contextmanager
    def stage(self, name: str, device: torch.device, stats: DecodeStats | None = None):
        """Time the block as stage ``name``; with ``stats``, also count its sequential flow evaluations."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, evals = time.perf_counter(), stats.evaluations if stats is not None else 0
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] += time.perf_counter() - start
        if stats is not None:
            self.evaluations[name] += stats.evaluations - evals

    def table(self) -> str:
        """One line per stage: seconds, share of the total, sequential flow evaluations."""
        total = sum(self.seconds.values()) or 1.0
        lines = [f"{'stage':<24}{'seconds':>10}{'share':>8}{'evals':>8}"]
        for name, sec in self.seconds.items():
            evals = str(self.evaluations[name]) if name in self.evaluations else ""
            lines.append(f"{name:<24}{sec:>10.3f}{sec / total:>8.1%}{evals:>8}".rstrip())
        lines.append(f"{'total':<24}{sum(self.seconds.values()):>10.3f}")
        return "\n".join(lines)


def check_settings(settings: SampleSettings, cfg: Config, negatives: list[str] | None = None) -> None:
    """Refuse settings that would not act on a model of config ``cfg`` (the model-dependent rules; the rest are in
    :meth:`SampleSettings.__post_init__`). Each message starts with the field's name, which ``starflow sample`` turns
    into its flag's.

    Raises:
        ValueError: ``guide_top`` above the number of flow blocks, 0 with guidance on (it would turn guidance off),
            or >= 1 for a ``cond_top_only`` model (where it would change nothing); ``attn_temp``, ``guide_top``, ``anneal_guidance``
            or negative prompts without guidance (``cfg`` 0); ``target_noise_std`` or ``self_denoising_lr`` for a
            ``noise_type: uniform`` model; video settings (``fps``, ``target_length``, ``context_length``) for an
            image model.
    """
    if settings.guide_top is not None and settings.guide_top > cfg.num_blocks:
        raise ValueError(f"guide_top {settings.guide_top}: the number of guided blocks must be in 0..{cfg.num_blocks} "
                         f"(this model has {cfg.num_blocks} flow blocks)")
    if settings.guide_top == 0 and settings.cfg > 0:
        raise ValueError(f"guide_top 0 guides no flow block, which turns guidance (cfg {settings.cfg:g}) off: pass cfg 0 "
                         f"for that, or guide_top 1..{cfg.num_blocks}")
    if not settings.cfg > 0:
        shaping = [name for name, on in (("attn_temp", settings.attn_temp != 1.0),
                                         ("guide_top", settings.guide_top is not None),
                                         ("anneal_guidance", settings.anneal_guidance),
                                         ("negative prompts", any(negatives or []))) if on]
        if shaping:
            verb = "act" if shaping[0] == "negative prompts" else "acts"
            raise ValueError(f"{shaping[0]} {verb} through classifier-free guidance, which is off (cfg "
                             f"{settings.cfg:g}): give a guidance weight cfg > 0")
    if cfg.noise_type == "uniform":
        tweedie = [name for name in ("target_noise_std", "self_denoising_lr") if getattr(settings, name) is not None]
        if tweedie:
            raise ValueError(f"{tweedie[0]} sets the Gaussian noise level and its Tweedie step; this model was trained "
                             "on 8-bit pixels with uniform dequantisation (noise_type: uniform), whose samples need no "
                             "denoising step: drop it")
    if settings.guide_top and cfg.cond_top_only:
        raise ValueError(f"guide_top {settings.guide_top}: this model (cond_top_only) reads the text in its deep block "
                         "alone, the first in sampling order, so guiding the first blocks is what it does without the "
                         "flag: drop it (guide_top acts on cond_top_only 0 models)")
    if not cfg.is_video:
        video = [name for name in ("fps", "target_length", "context_length") if getattr(settings, name) is not None]
        if video:
            raise ValueError(f"{video[0]} is for video configs; this config has no vid_size")
