"""VAE geometry from a config's ``vae`` name alone, for code that sizes a model without loading the VAE.

A loaded adapter knows its own factors (``LatentAdapter.downsample``, ``temporal_downsample``); this module
answers the same question for a name on the meta device (``starflow validate``, sizing, model folders
without their VAE). SPEC sections 1, 11 and 13: no VAE -> 1x; SD-VAE -> 8x spatial; the WAN2.2 VAE ->
16x spatial and 4x temporal (``T' = (T - 1) / 4 + 1``). A name is WAN2.2 when a path component or a
``_``/``-``/``.``-separated word starts with ``wan`` (``Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6``, ``/models/wan22_vae``),
so ``/data/swanson/sd-vae-ft-ema`` is an SD-VAE.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["VAEGeometry", "vae_geometry", "geometry_is_known", "is_wan_vae", "no_vae"]

_WAN_NAME = re.compile(r"(?:^|[/\\_.-])wan", re.IGNORECASE)
SD_VAE_DOWNSAMPLE = 8  # stabilityai/sd-vae-ft-ema: 2 ** (len(block_out_channels) - 1)
WAN_DOWNSAMPLE, WAN_TEMPORAL_DOWNSAMPLE = 16, 4  # Wan2.2 TI2V-5B: scale_factor_spatial / scale_factor_temporal


@dataclass(frozen=True)
class VAEGeometry:
    """Downsampling factors of a latent space: latent side = pixel side // ``downsample``; latent frames
    ``T' = (T - 1) // temporal_downsample + 1``."""

    downsample: int = 1
    temporal_downsample: int = 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames of ``frames`` pixel frames.

        Raises:
            ValueError: ``frames < 1``.
        """
        if frames < 1:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        return (frames - 1) // self.temporal_downsample + 1

    def check_img_size(self, img_size: int, patch_size: int) -> None:
        """Refuse a config ``img_size`` (pixels) that is no multiple of ``downsample * patch_size``: the latent grid
        would not split into patches, and the image would be cropped silently.

        Raises:
            ValueError: naming the factor and the two nearest sizes that work.
        """
        multiple = self.downsample * patch_size
        if img_size % multiple:
            lower, upper = img_size // multiple * multiple, -(-img_size // multiple) * multiple
            raise ValueError(f"config key 'img_size' ({img_size}) must be a multiple of the VAE's factor x patch_size "
                             f"({self.downsample} x {patch_size} = {multiple}): use "
                             + (f"{lower} or {upper}" if lower else f"{upper}"))

    def check_decodable(self, frames: int, name: str = "target_length") -> None:
        """Refuse a pixel frame count the VAE does not decode (``tk + 1``, ``t`` = ``temporal_downsample``).

        Raises:
            ValueError: named ``name`` (a field or a flag), with the two nearest counts it takes.
        """
        t = self.temporal_downsample
        if (frames - 1) % t:
            lower = 1 + (frames - 1) // t * t
            raise ValueError(f"{name} {frames}: the VAE decodes {t}k+1 frames (temporal factor {t}); use {lower} or "
                             f"{lower + t}")


def no_vae(name: str | None) -> bool:
    """Whether config ``vae`` means pixels (None, ``""`` or ``"none"``)."""
    return name is None or name.strip().lower() in ("", "none")


def is_wan_vae(name: str) -> bool:
    """Whether a ``vae`` name is a WAN2.2 VAE (see the module docstring)."""
    return bool(_WAN_NAME.search(name))


def geometry_is_known(name: str | None) -> bool:
    """Whether :func:`vae_geometry` knows the factors of ``name`` (pixels, a WAN2.2 VAE or an SD-VAE named as such)
    rather than assuming SD-VAE's 8 for another autoencoder (a local one may have any factor: only loading it says)."""
    return no_vae(name) or is_wan_vae(name) or "sd-vae" in name.lower()


def vae_geometry(name: str | None) -> VAEGeometry:
    """The factors of the VAE a config names (see the module docstring)."""
    if no_vae(name):
        return VAEGeometry()
    if is_wan_vae(name):
        return VAEGeometry(WAN_DOWNSAMPLE, WAN_TEMPORAL_DOWNSAMPLE)
    return VAEGeometry(SD_VAE_DOWNSAMPLE)
